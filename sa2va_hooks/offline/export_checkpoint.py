"""Offline re-export: config + checkpoint -> verified HF snapshot, strictly.

1. Load the checkpoint safely (before any model code runs).
2. Build the model exactly as training did: the config's own builder, the run's seed, and the
   model's own ``pretrained_pth`` loading; then account for every ``pretrained_pth`` key.
3. Apply the checkpoint under the strict rules (``load_plan``).
4. Check the trained tensors against the fingerprints recorded in training, bit for bit, and
   the frozen tensors' root digest against the one recorded at ``before_train``.
5. ``export_hf`` - the same code path as the in-loop hook, so the root digest is the same.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..compat import allow_mmengine_checkpoint_globals, apply_torch_cpu_bf16_shim
from ..core.fingerprint import compare_fingerprints
from ..core.manifest import ExportManifest
from ..core.publish import clean_leftovers
from ..converters.base import converter_for_run
from ..export import export_hf, frozen_root, trained_fingerprints
from .checkpoint_io import extract_state_dict, load_checkpoint, recorded_fingerprints
from .load_plan import apply_load_plan, full_state, plan_load
from ..core.errors import MismatchError, OutputExistsError


class FingerprintMismatchError(MismatchError, RuntimeError):
    """The model rebuilt offline does not hold what training recorded."""


class PretrainedMostlyUnusedError(MismatchError, RuntimeError):
    """Most of pretrained_pth did not fit the model (and --strict-pretrained was given)."""


@dataclasses.dataclass
class PretrainedReport:
    path: str
    total: int
    loaded: int
    skipped_for_shape: list[tuple[str, list[int], list[int]]]
    unused: list[str]  # keys the model does not have at all
    not_applied: list[str]  # fitting keys whose values the built model does not hold

    @property
    def unusable_fraction(self) -> float:
        return (len(self.skipped_for_shape) + len(self.unused)) / self.total if self.total else 0.0

    def to_json(self) -> dict:
        return {"path": self.path, "total": self.total, "loaded": self.loaded,
                "skipped_for_shape": len(self.skipped_for_shape), "unused": len(self.unused),
                "not_applied": len(self.not_applied), "unusable_fraction": round(self.unusable_fraction, 4),
                "examples_skipped_for_shape": [list(x) for x in self.skipped_for_shape[:10]],
                "examples_unused": self.unused[:10]}

    def lines(self) -> list[str]:
        out = [f"pretrained_pth {self.path}: {self.total} keys: {self.loaded} loaded, "
               f"{len(self.skipped_for_shape)} skipped for shape, {len(self.unused)} absent from the model"]
        out += [f"  skipped for shape: {k} file {a} vs model {b}" for k, a, b in self.skipped_for_shape[:10]]
        out += [f"  absent from the model: {k}" for k in self.unused[:10]]
        if self.not_applied:
            out.append(f"  {len(self.not_applied)} fitting key(s) do not hold the file's values in the built model: "
                       f"{self.not_applied[:10]}")
        return out


def pretrained_report(model: nn.Module, path: str, *, allow_pickle: bool) -> PretrainedReport:
    """Account for every key of pretrained_pth against the model as built (before the checkpoint
    is applied), independently of how the model's own loader treated it."""
    state = extract_state_dict(load_checkpoint(path, allow_pickle=allow_pickle), path)
    own = full_state(model)
    fitting = [k for k in state if k in own and tuple(own[k].shape) == tuple(state[k].shape)]
    skipped = [(k, list(state[k].shape), list(own[k].shape)) for k in state
               if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    unused = [k for k in state if k not in own]
    not_applied = [k for k in fitting if not torch.equal(own[k].detach().cpu(), state[k].to(own[k].dtype))]
    return PretrainedReport(path, len(state), len(fitting), skipped, unused, not_applied)


@dataclasses.dataclass
class OfflineExportResult:
    manifest: ExportManifest
    out_dir: Path
    report: dict
    lines: list[str]


def build_model_from_config(config: str | Path, cfg_options: dict | None = None,
                            seed: int | None = None) -> tuple[Any, nn.Module]:
    """Build the model as the Runner does: the config's registry/builder, and the run's seed
    (``seed`` - the one the checkpoint's meta recorded - wins over the config's)."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import set_random_seed
    apply_torch_cpu_bf16_shim()
    cfg = Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get("default_scope", "mmengine"))
    randomness = cfg.get("randomness") or {}
    seed = seed if seed is not None else randomness.get("seed")
    if seed is not None:
        # Frozen tensors that the model initialises randomly (e.g. rows added to a resized
        # embedding) depend on the seed; without it the frozen root digest cannot match.
        set_random_seed(seed, deterministic=randomness.get("deterministic", False))
    model = MODELS.build(cfg.model)
    return cfg, model


def _config_sha256(config: str | Path) -> str:
    return hashlib.sha256(Path(config).read_bytes()).hexdigest()


def _check_recorded(model: nn.Module, recorded, lines: list[str]) -> dict:
    """Compare with what training recorded; raise naming every differing tensor."""
    if recorded.trained is None:
        lines.append("WARNING: the checkpoint has no recorded fingerprints (trained before sa2va_hooks?); the export "
                     "is exported as loaded but cannot be proven equal to what training had in memory")
        return {"checked": False, "reason": "no fingerprints recorded"}
    # recomputed with the digest algorithms the record names: a checkpoint of an older version still checks
    now = trained_fingerprints(model, algorithms={n: fp.algorithm for n, fp in recorded.trained.tensors.items()})
    problems = [str(p) for p in compare_fingerprints(recorded.trained.tensors, now.tensors)]
    frozen_now = frozen_root(model, algorithm=recorded.frozen_root_algorithm)
    if recorded.frozen_root and recorded.frozen_root != frozen_now:
        problems.append(f"mismatch frozen root digest: expected {recorded.frozen_root} (recorded at before_train), "
                        f"got {frozen_now}: the base model directory, pretrained_pth or seed differs from training")
    if problems:
        raise FingerprintMismatchError(
            f"the model rebuilt offline does not hold what training recorded ({recorded.source}); "
            f"{len(problems)} problem(s):\n" + "\n".join(problems[:50]) +
            "\nFix the inputs, or pass --no-verify to export anyway (recorded in the manifest).")
    lines.append(f"verified: {len(now.tensors)} trained tensors match the fingerprints in {recorded.source} bit for "
                 f"bit (root {now.root}); frozen root {frozen_now} matches")
    return {"checked": True, "source": recorded.source, "trained_root": now.root, "frozen_root": frozen_now}


def _hook_settings(cfg: Any) -> dict:
    """The HFExportHook settings in the training config, so that an offline export of a run is
    made exactly as its in-loop exports were (converter, dtype, tokenizer, shard size)."""
    for hook in cfg.get("custom_hooks") or []:
        kind = hook.get("type")
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        if name.split(".")[-1] == "HFExportHook":
            return {k: hook[k] for k in ("converter", "dtype", "tokenizer", "max_shard_size") if k in hook}
    return {}


def _resolve_settings(cfg: Any, converter: Any, dtype: Any, max_shard_size: Any,
                      hf_code_dir: str | None = None) -> tuple[Any, Any, Any]:
    hook = _hook_settings(cfg)
    converter = hook.get("converter", "auto") if converter in (None, "auto") else converter
    dtype = hook.get("dtype") if dtype is None else dtype
    max_shard_size = max_shard_size or hook.get("max_shard_size", "5GB")
    extra = {}
    if hook.get("tokenizer") is not None:  # what the user gave the hook wins, as it did in the loop
        extra["tokenizer"] = _built(hook["tokenizer"])
    if hf_code_dir:
        extra["hf_code_dir"] = str(hf_code_dir)
    if extra and not hasattr(converter, "map_keys"):
        converter = {**(dict(converter) if isinstance(converter, dict) else {"type": converter}), **extra}
    return converter, dtype, max_shard_size


def _built(spec: Any) -> Any:
    from ..records import build_callable_cfg
    return build_callable_cfg(spec) if isinstance(spec, dict) else spec


def run_defaults(cfg: Any) -> dict:
    """The config's top-level ``template`` and ``tokenizer`` (built only if the model has none), as
    :func:`~sa2va_hooks.converters.base.converter_for_run` takes them. Every Sa2VA config has both; the
    tokenizer there is the base one, without ``[SEG]``, so it is the last resort."""
    tok = cfg.get("tokenizer")
    return {"template": cfg.get("template"), "tokenizer": (lambda: _built(tok)) if tok is not None else None}


def _check_out_first(out: Path, overwrite: bool, log: Callable[[str], None]) -> None:
    """Before any work: undo or remove our own leftovers for this exact name (an interrupted replace
    is restored), then refuse an ``--out`` that exists without ``--overwrite``, or that is not a
    directory, so nothing is computed for an export that cannot be published."""
    clean_leftovers(out.parent, owns=lambda name: name == out.name, log=log)
    if out.exists() and (not out.is_dir() or out.is_symlink()):
        raise OutputExistsError(f"--out {out} exists and is not a snapshot directory; "
                                "remove it or choose another path.")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} already exists; pass --overwrite to replace it (the old snapshot stays "
                              "in place until the new one is complete), or choose another path.")


def export_checkpoint(config: str | Path, checkpoint: str | Path, out_dir: str | Path, *, converter: Any = "auto",
                      dtype: Any = None, max_shard_size: int | str | None = None, cfg_options: dict | None = None,
                      overwrite: bool = False, verify: bool = True, allow_pickle: bool = False,
                      strict_pretrained: bool = False, pretrained_threshold: float = 0.5, progress: bool = False,
                      hf_code_dir: str | Path | None = None,
                      log: Callable[[str], None] = print) -> OfflineExportResult:
    allow_mmengine_checkpoint_globals()
    lines: list[str] = []
    _check_out_first(Path(out_dir), overwrite, log)
    ckpt = load_checkpoint(checkpoint, allow_pickle=allow_pickle, log=log)
    state = extract_state_dict(ckpt, checkpoint)
    recorded = recorded_fingerprints(ckpt, checkpoint)
    seed = (ckpt.get("meta") or {}).get("seed")
    cfg, model = build_model_from_config(config, cfg_options, seed=seed)
    model.eval()
    converter, dtype, max_shard_size = _resolve_settings(cfg, converter, dtype, max_shard_size, hf_code_dir)
    converter = converter_for_run(converter, model, **run_defaults(cfg))  # refuses before any tensor is merged

    report: dict[str, Any] = {"checkpoint_tensors": len(state), "allow_pickle": allow_pickle, "seed": seed}
    pretrained = cfg.model.get("pretrained_pth")
    if pretrained:
        pre = pretrained_report(model, str(pretrained), allow_pickle=allow_pickle)
        report["pretrained_pth"] = pre.to_json()
        lines += pre.lines()
        if pre.unusable_fraction > pretrained_threshold:
            msg = (f"!!! pretrained_pth {pretrained}: {pre.unusable_fraction:.0%} of its {pre.total} keys did NOT load "
                   f"({len(pre.skipped_for_shape)} skipped for shape, {len(pre.unused)} absent from the model). "
                   "It was probably written for another model size or family. !!!")
            if strict_pretrained:
                raise PretrainedMostlyUnusedError(msg + " (--strict-pretrained)")
            lines.append(msg)
            log(msg)

    plan = plan_load(model, state)
    apply_load_plan(model, state, plan)
    report["key_fixes"] = plan.fixes_summary()
    for kind, keys in plan.fixes.items():
        lines.append(f"fixed automatically: {kind}: {len(keys)} key(s), e.g. {keys[:3]}")
    lines.append(f"checkpoint applied: {len(plan.mapping)} tensors, every trainable parameter present")

    if verify:
        report["verification"] = _check_recorded(model, recorded, lines)
    else:
        report["verification"] = {"checked": False, "reason": "--no-verify given"}
        lines.append("WARNING: --no-verify: the export was NOT checked against the recorded fingerprints")

    provenance = {"exported_by": "tools/export.py", "checkpoint": str(checkpoint), "config": str(config),
                  "config_sha256": _config_sha256(config), "iteration": recorded.iteration,
                  "epoch": recorded.epoch, "offline": report}
    manifest = export_hf(model, out_dir, converter=converter, dtype=dtype, max_shard_size=max_shard_size,
                         provenance=provenance, baseline=recorded.baseline, overwrite=overwrite, progress=progress)
    return OfflineExportResult(manifest, Path(out_dir), report, lines)
