"""Applying a trainable-only checkpoint to a freshly built model, strictly.

The rules (DESIGN.md):
- every checkpoint key lands on a model key of the same shape;
- every parameter that is trainable in the built model is in the checkpoint;
- benign renames are fixed automatically, and every fix is reported: a DDP ``module.`` prefix,
  and PEFT-style keys without the adapter name (what ``get_peft_model_state_dict`` writes, and
  so what xtuner's ``SupervisedFinetune.state_dict`` saves);
- anything else is an error that lists the keys and names the likely cause.

The target key space is ``nn.Module.state_dict`` of the model, not ``model.state_dict()``:
Sa2VA-style models override ``state_dict`` to return only the trainable parts.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Mapping

import torch
from torch import nn
from ..core.errors import MismatchError

FIX_DDP = "DDP 'module.' prefix removed"
FIX_PEFT = "PEFT-style key without the adapter name mapped to the adapter's parameter"


class CheckpointMismatchError(MismatchError, ValueError):
    """The checkpoint does not fit the model built from the config."""


@dataclasses.dataclass
class LoadPlan:
    mapping: dict[str, str]  # checkpoint key -> model key
    fixes: dict[str, list[str]]  # fix kind -> checkpoint keys it applied to

    def fixes_summary(self) -> dict[str, dict]:
        return {kind: {"count": len(keys), "examples": keys[:5]} for kind, keys in self.fixes.items()}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, bypassing a ``state_dict`` override."""
    return dict(nn.Module.state_dict(model, keep_vars=True))


def _adapter_names(model: nn.Module) -> set[str]:
    names = set()
    for m in model.modules():
        for attr in ("lora_A", "modules_to_save"):
            container = getattr(m, attr, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                names.update(container.keys())
    return names


def _peft_aliases(targets: Mapping[str, torch.Tensor], adapters: set[str]) -> dict[str, str]:
    """PEFT-saved name -> model name: ``.lora_A.default.weight`` is saved as ``.lora_A.weight``
    and ``.modules_to_save.default.weight`` as ``.weight``. Ambiguous aliases are left out."""
    found: dict[str, list[str]] = defaultdict(list)
    for key in targets:
        for a in adapters:
            alias = key.replace(f".modules_to_save.{a}.", ".")
            alias = re.sub(rf"\.(lora_\w+)\.{re.escape(a)}(\.|$)", r".\1\2", alias)
            if alias != key:
                found[alias].append(key)
    return {alias: keys[0] for alias, keys in found.items() if len(keys) == 1 and alias not in targets}


def plan_load(model: nn.Module, state: Mapping[str, torch.Tensor]) -> LoadPlan:
    targets = full_state(model)
    aliases = _peft_aliases(targets, _adapter_names(model))
    mapping: dict[str, str] = {}
    fixes: dict[str, list[str]] = defaultdict(list)
    unknown = []
    for key in state:
        bare = key.removeprefix("module.")
        if key in targets:
            mapping[key] = key
        elif bare in targets or bare in aliases:
            if bare != key:
                fixes[FIX_DDP].append(key)
            if bare not in targets:
                fixes[FIX_PEFT].append(key)
            mapping[key] = bare if bare in targets else aliases[bare]
        else:
            unknown.append(key)
    shape = [(k, tuple(state[k].shape), tuple(targets[m].shape)) for k, m in mapping.items()
             if tuple(state[k].shape) != tuple(targets[m].shape)]
    dup = [m for m in set(mapping.values()) if list(mapping.values()).count(m) > 1]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in set(mapping.values())]
    problems = _explain(unknown, shape, missing, dup, targets)
    if problems:
        raise CheckpointMismatchError("the checkpoint does not fit the model built from the config; nothing was "
                                      "exported:\n" + "\n".join(problems))
    return LoadPlan(mapping, dict(fixes))


def apply_load_plan(model: nn.Module, state: Mapping[str, torch.Tensor], plan: LoadPlan) -> None:
    """Copy the checkpoint into the freshly built model (never a live training model)."""
    targets = full_state(model)
    with torch.no_grad():
        for key, target in plan.mapping.items():
            targets[target].copy_(state[key])


def _head(items: list[str], n: int = 20) -> str:
    return ", ".join(items[:n]) + (f" ... and {len(items) - n} more" if len(items) > n else "")


def _explain(unknown: list[str], shape: list[tuple], missing: list[str], dup: list[str],
             targets: Mapping[str, torch.Tensor]) -> list[str]:
    problems = []
    if unknown:
        problems.append(f"- {len(unknown)} checkpoint key(s) match no model key: {_head(unknown)}.\n"
                        f"  Likely cause: {_unknown_cause(unknown, targets)}")
    if shape:
        lines = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in shape]
        problems.append(f"- {len(shape)} key(s) with a different shape: {_head(lines)}.\n"
                        f"  Likely cause: {_shape_cause(shape)}")
    if missing:
        problems.append(f"- {len(missing)} parameter(s) trainable in the built model are not in the checkpoint: "
                        f"{_head(missing)}.\n  Likely cause: the config trains other modules than the run that "
                        "wrote this checkpoint (freeze settings, LoRA targets, modules_to_save), or the checkpoint "
                        "is not from this config. Exporting would silently keep their untrained values.")
    if dup:
        problems.append(f"- several checkpoint keys land on the same model key: {_head(sorted(dup))}; the checkpoint "
                        "holds both a prefixed and an unprefixed copy. Remove one.")
    return problems


def _unknown_cause(unknown: list[str], targets: Mapping[str, torch.Tensor]) -> str:
    keys = list(targets)
    if any(k.startswith("base_model.model.") and any(t.endswith(k.removeprefix("base_model.model.")) for t in keys)
           for k in unknown[:50]):
        return ("a wrapper prefix ('base_model.model.', a PeftModel saved on its own) that the built model places "
                "elsewhere; re-save the checkpoint with the training wrapper's names or map the prefix.")
    if any(".lora_" in k for k in unknown):
        modules = {k.split(".lora_")[0] for k in unknown if ".lora_" in k}
        known = {k.split(".lora_")[0] for k in keys if ".lora_" in k}
        if modules - known:
            return (f"different LoRA targets or adapter name: e.g. {sorted(modules - known)[:3]} carry LoRA in the "
                    "checkpoint but not in the built model. Use the LoRA config (target_modules, adapter name) the "
                    "run was trained with.")
        return "an adapter-name difference (e.g. '.default' vs another name); use the run's adapter name."
    return "the checkpoint comes from another model or config; check CONFIG matches the run that wrote CHECKPOINT."


def _shape_cause(shape: list[tuple]) -> str:
    causes = []
    if any(".lora_" in k for k, _, _ in shape):
        causes.append("a different LoRA rank (lora_A/lora_B sizes differ): use the run's r")
    if any(re.search(r"(embed_tokens|lm_head|tok_embeddings|output)\b", k) for k, _, _ in shape):
        causes.append("a vocabulary size changed by added tokens (embedding rows differ): build with the same "
                      "tokenizer and special tokens as the run")
    if not causes:
        causes.append("a different architecture setting in the config (hidden sizes, head dims)")
    return "; ".join(causes) + "."
