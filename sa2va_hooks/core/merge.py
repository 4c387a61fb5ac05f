"""Out-of-place LoRA merge, one tensor at a time, for whatever model is in memory.

The walker turns a live module tree (plain, PEFT-wrapped, or a training wrapper with PEFT
models somewhere inside it) into a list of :class:`SourceTensor` plans. Each plan knows its
exported name, shape and dtype before any data is produced, so a writer can lay out shards
first and then materialise tensors one by one: peak extra memory is about one shard.

Why out of place: PEFT's ``merge()``/``unmerge()`` on a live bf16 layer does not restore the
base weight exactly (2 % of elements changed in the anchor measurement), so merging during
training would corrupt it. Here PEFT's own ``merge(safe_merge=True)`` runs on a private fp32
stand-in of each tuner layer (base weights, adapter weights, caches all private copies), so
every variant PEFT can merge (LoRA, rsLoRA, DoRA, lora_bias, AdaLoRA, LoHa, LoKr, IA3, ...) is
merged by PEFT's own math; the live module, its parameters and their version counters are
never touched.

This module plans; :mod:`.materialize` holds what runs when a plan is produced (the private
stand-in, the dequantization of QLoRA bases, the casts and finite checks).

Naming: PEFT wrappers (``PeftModel.base_model.model``, ``base_layer``, ``modules_to_save.<name>``)
are transparent, so names come out as the unwrapped HF model would have them. The training-time
parameter names that feed each tensor are kept in ``sources``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

# MergedTensor, NonFiniteError, UnsupportedModuleError, non_finite_names, dequantized_weight and
# quantization_of are imported from here by the export pipeline, the package's face and the tests
from .materialize import (MergedTensor, MergeGroup, NonFiniteError, UnsupportedModuleError, all_finite,  # noqa: F401
                          cast_copy, delta_norms, dequantized_weight, unpacked_weight_shape, non_finite_names,
                          quantization_of, refuse_cpu_packed_4bit, same_after_cast)
from .peft_compat import AuxiliaryTrainingWrapper, active_saved_copies
from .sharding import is_fsdp_module
from .sharding import logical_shape as sharded_shape
from .snapshot import live, read

ROLE_FROZEN = "frozen"
ROLE_TRAINABLE = "trainable"  # a parameter trained directly (projector, head, mask decoder)
ROLE_LORA = "lora_merged"  # a base weight with one or more LoRA deltas added
ROLE_SAVED_COPY = "modules_to_save"  # PEFT's trained copy of a whole module


@dataclasses.dataclass
class SourceTensor:
    """A plan for one exported tensor: its name and layout now, its data on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the live source tensor
    role: str
    sources: tuple[str, ...]  # training-time names of the parameters that feed this tensor
    _produce: Callable[[torch.dtype | None], MergedTensor] = dataclasses.field(repr=False)
    # parameters that must be whole while this tensor is produced (ZeRO-3 gathers them; a no-op
    # for parameters that are not partitioned)
    gather: tuple[torch.Tensor, ...] = dataclasses.field(default=(), repr=False)
    # computed from frozen tensors only: expected byte-identical from one export to the next, so
    # it goes into a shard of frozen tensors that a later export can hard-link
    static: bool = False

    def out_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """Floating tensors take the export dtype; integer and bool buffers keep theirs."""
        if dtype is not None and self.dtype.is_floating_point:
            return dtype
        return self.dtype

    def materialize(self, dtype: torch.dtype | None) -> MergedTensor:
        """Produce the exported tensor on its source device, contiguous, in ``out_dtype(dtype)``."""
        return self._produce(self.out_dtype(dtype))


def _plain(name: str, t: torch.Tensor, role: str, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        src, private = read(t)
        return MergedTensor(cast_copy(src, dtype, private))

    gather = (t,) if isinstance(t, nn.Parameter) else ()
    static = not getattr(t, "requires_grad", False)
    return SourceTensor(name, sharded_shape(t), t.dtype, role, (source,), produce, gather, static)


def _tuner_adapters(layer: nn.Module) -> set[str]:
    present: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = layer._modules.get(attr)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            present.update(container.keys())
    return present


def _adapters_to_merge(layer: nn.Module, name: str) -> tuple[list[str], list[str]]:
    """(adapters whose effect belongs in the export: active, present, not merged yet; inactive ones)."""
    if getattr(layer, "disable_adapters", False):
        raise UnsupportedModuleError(
            f"PEFT module '{name}' has its adapters disabled, so the model in memory computes with the base "
            "weights only. Re-enable the adapter (model.enable_adapter_layers()) or export the base on purpose.")
    present = _tuner_adapters(layer)
    active = [a for a in layer.active_adapters if a in present]
    already = set(getattr(layer, "merged_adapters", []))
    return [a for a in active if a not in already], sorted(present - set(active))


def _merged_base_tensor(name: str, pname: str, original: torch.Tensor, group: MergeGroup, role: str,
                        sources: tuple[str, ...], base: nn.Module) -> SourceTensor:
    quantized = quantization_of(original) is not None
    shape = unpacked_weight_shape(base, pname, original)
    dtype0 = torch.float32 if quantized else original.dtype

    def produce(dtype: torch.dtype) -> MergedTensor:
        merged32 = group.take(pname)
        ref = dequantized_weight(base) if quantized else live(original)
        delta, base_norm = delta_norms(merged32, ref)
        # the base was checked finite before the merge: a NaN/Inf in the merge makes the fp64 delta
        # norm NaN/Inf, and a finite one proves none (no check of its own: fewer calls, issue 18)
        if not math.isfinite(delta) and merged32.is_floating_point() and not all_finite(merged32):
            raise NonFiniteError(f"merged '{_join(name, pname)}' has NaN or Inf: the adapter weights are not "
                                     "finite. Check the training loss for divergence before exporting.")
        out = cast_copy(merged32, dtype)
        rel = delta / base_norm if base_norm else (float("inf") if delta else 0.0)
        # a frozen base parameter other than the weight (a bias) is "merged" only if the tuner
        # changed it (lora_bias, IA3); otherwise it is an ordinary frozen tensor
        final_role = ROLE_FROZEN if role == ROLE_FROZEN and delta == 0.0 else \
            ROLE_LORA if role == ROLE_FROZEN else role
        # a directly trained parameter's base is its value before training, which only a
        # baseline (recorded by the hooks) knows; the live value is not it
        differs = None if final_role == ROLE_TRAINABLE else not same_after_cast(out, ref, dtype)
        return MergedTensor(out, final_role, rel if final_role == ROLE_LORA else None, differs)

    return SourceTensor(_join(name, pname), shape, dtype0, role, sources, produce, tuple(group.layer.parameters()))


def _dequantized(name: str, module: nn.Module, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        return MergedTensor(cast_copy(dequantized_weight(module), dtype))

    shape = (int(module.out_features), int(module.in_features))
    return SourceTensor(name, shape, torch.float32, ROLE_FROZEN, (source,), produce, tuple(module.parameters()),
                        static=True)


def _saved_copy(name: str, t: torch.Tensor, original: torch.Tensor | None, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        src, private = read(t)
        out = cast_copy(src, dtype, private)
        differs = None if original is None else not same_after_cast(out, live(original), dtype)
        return MergedTensor(out, None, None, differs)

    gather = (t,) if original is None else (t, original)
    return SourceTensor(name, sharded_shape(t), t.dtype, ROLE_SAVED_COPY, (source,), produce, gather)


@dataclasses.dataclass
class WalkResult:
    tensors: list[SourceTensor]
    tied: dict[str, str]  # name skipped because it shares storage with -> name exported
    inactive: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # adapter -> modules, not merged
    dequantized: list[str] = dataclasses.field(default_factory=list)  # quantized bases written dequantized


class _Walker:
    """Depth-first walk that strips PEFT wrappers and plans every exported tensor."""

    def __init__(self) -> None:
        self.out: list[SourceTensor] = []
        self.tied: dict[str, str] = {}
        self._seen: dict[int, str] = {}
        self.inactive: dict[str, list[str]] = {}  # adapter -> modules where it exists but is not active
        self.dequantized: list[str] = []  # modules whose quantized base was dequantized for the export

    def _emit(self, st: SourceTensor, key: torch.Tensor) -> None:
        # Tied parameters (e.g. lm_head tied to embed_tokens) are exported once, like
        # save_pretrained does; from_pretrained ties them again from the config.
        first = self._seen.get(id(key))
        if first is not None:
            self.tied[st.name] = first
            return
        self._seen[id(key)] = st.name
        self.out.append(st)

    def _own_tensors(self, module: nn.Module, name: str, tprefix: str, skip: set[str] = frozenset()) -> None:
        for pname, p in module._parameters.items():
            if p is None or pname in skip:
                continue
            if pname == "weight" and quantization_of(p):
                self.dequantized.append(name)
                self._emit(_dequantized(_join(name, pname), module, tprefix + pname), p)
                continue
            role = ROLE_TRAINABLE if p.requires_grad else ROLE_FROZEN
            self._emit(_plain(_join(name, pname), p, role, tprefix + pname), p)
        for bname, b in module._buffers.items():
            if b is None or bname in module._non_persistent_buffers_set or bname in skip:
                continue
            self._emit(_plain(_join(name, bname), b, ROLE_FROZEN, tprefix + bname), b)

    def walk(self, module: nn.Module, name: str = "", tprefix: str = "") -> None:
        if is_fsdp_module(module):  # transparent, as in FSDP's own state dicts
            return self.walk(module._fsdp_wrapped_module, name, tprefix)
        if isinstance(module, PeftModel):
            cfg = module.peft_config.get(module.active_adapter)
            if cfg is not None and getattr(cfg, "is_prompt_learning", False):
                raise UnsupportedModuleError(
                    f"PeftModel '{name or 'model'}' uses {cfg.peft_type} (prompt learning): its trained virtual tokens "
                    "live outside the weights and cannot be merged into an HF snapshot. Refusing to export the "
                    "untrained base; save the adapter with save_pretrained() instead.")
            return self.walk(module.base_model, name, tprefix + "base_model.")
        if isinstance(module, BaseTuner):
            return self.walk(module.model, name, tprefix + "model.")
        if isinstance(module, ModulesToSaveWrapper):
            return self._walk_saved_copy(module, name, tprefix)
        if isinstance(module, AuxiliaryTrainingWrapper):
            raise UnsupportedModuleError(
                f"module '{name}' is a PEFT {type(module).__name__}, which sa2va_hooks does not export yet. Refusing "
                "to export without its trained weights; merge it with PEFT offline instead.")
        if isinstance(module, BaseTunerLayer):
            return self._walk_tuner_layer(module, name, tprefix)
        self._own_tensors(module, name, tprefix)
        for cname, child in module._modules.items():
            if child is not None:
                self.walk(child, _join(name, cname), f"{tprefix}{cname}.")

    def _walk_tuner_layer(self, layer: nn.Module, name: str, tprefix: str) -> None:
        adapters, inactive = _adapters_to_merge(layer, name)
        for a in inactive:
            self.inactive.setdefault(a, []).append(name)
        base = layer.get_base_layer()
        depth = 0
        inner = layer
        while inner is not base:
            inner, depth = inner.base_layer, depth + 1
        bprefix = tprefix + "base_layer." * depth
        if not adapters:
            self._own_tensors(base, name, bprefix)
        else:
            group = MergeGroup(layer, name, adapters)
            adapter_sources = tuple(f"{tprefix}{n}" for n, _ in layer.named_parameters()
                                    if not n.startswith("base_layer.") and any(f".{a}." in f".{n}." for a in adapters))
            for pname, p in base._parameters.items():
                if p is None:
                    continue
                role = ROLE_LORA if pname == "weight" else ROLE_TRAINABLE if p.requires_grad else ROLE_FROZEN
                self._emit(_merged_base_tensor(name, pname, p, group, role, (bprefix + pname,) + adapter_sources,
                                               base), p)
            if quantization_of(getattr(base, "weight", torch.empty(0))):
                self.dequantized.append(name)
            for bname, b in base._buffers.items():
                if b is not None and bname not in base._non_persistent_buffers_set:
                    self._emit(_plain(_join(name, bname), b, ROLE_FROZEN, bprefix + bname), b)
        for cname, child in base._modules.items():
            if child is not None:
                self.walk(child, _join(name, cname), f"{bprefix}{cname}.")

    def _walk_saved_copy(self, wrapper: nn.Module, name: str, tprefix: str) -> None:
        if getattr(wrapper, "disable_adapters", False):
            raise UnsupportedModuleError(
                f"modules_to_save wrapper '{name}' has its adapters disabled, so the model uses the original module. "
                "Re-enable the adapter before exporting.")
        active = active_saved_copies(wrapper)
        adapter = active[0] if active else None
        if adapter not in wrapper.modules_to_save:
            raise UnsupportedModuleError(
                f"modules_to_save wrapper '{name}' has no copy for active adapter '{adapter}' "
                f"(has {sorted(wrapper.modules_to_save)}).")
        for other in sorted(set(wrapper.modules_to_save) - {adapter}):
            self.inactive.setdefault(other, []).append(name)
        trained = wrapper.modules_to_save[adapter]
        originals = dict(wrapper.original_module.named_parameters())
        for pname, p in trained.named_parameters():
            st = _saved_copy(_join(name, pname), p, originals.get(pname),
                             f"{tprefix}modules_to_save.{adapter}.{pname}")
            self._emit(st, p)
        for bname, b in trained.named_buffers():
            self._emit(_plain(_join(name, bname), b, ROLE_FROZEN, f"{tprefix}modules_to_save.{adapter}.{bname}"), b)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def plan_merged_tensors(module: nn.Module) -> WalkResult:
    """Plan every tensor of the merged, unwrapped model, without producing any data."""
    refuse_cpu_packed_4bit(module)
    walker = _Walker()
    walker.walk(module)
    return WalkResult(walker.out, walker.tied, walker.inactive, walker.dequantized)
