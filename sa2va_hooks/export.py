"""``export_hf``: the one path from an in-memory model to a verified HF snapshot.

The hooks and ``tools/export.py`` both call this, so an in-loop export and an offline
re-export of the same weights give the same root digest.
"""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .converters.base import SnapshotContext, resolve_converter
from .core.fingerprint import (Fingerprint, FingerprintSet, compare_fingerprints, fingerprint_state, fingerprint_tensor,
                               root_digest)
from .core.host import HostStager
from .core.manifest import MANIFEST_FILE, ExportManifest, TrainingEffect, package_versions, sha256_file
from .core.merge import (ROLE_FROZEN, ROLE_LORA, ROLE_TRAINABLE, frozen_parameters, plan_merged_tensors,
                         trainable_parameters)
from .core.verify import hash_safetensors_file
from .core.writer import (TensorSlot, check_free_space, file_entries, plan_shards, publish, staging_dir_for,
                          write_json, write_shards)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ExportVerificationError(RuntimeError):
    """What was read back from disk is not what was computed in memory."""


def parse_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in ("auto", "none", "keep"):
        return None
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto' (keep as in memory)") \
            from None


def trained_fingerprints(model: nn.Module) -> FingerprintSet:
    """Fingerprints of every trainable parameter under its training-time (checkpoint) name."""
    return FingerprintSet.of(fingerprint_state(trainable_parameters(model)))


def frozen_root(model: nn.Module) -> str:
    """One digest over every frozen parameter: catches a changed base model or pretrained_pth."""
    return FingerprintSet.of(fingerprint_state(frozen_parameters(model))).root


def _readback(staging: Path, files: list[str], expected: Mapping[str, dict]) -> None:
    got: dict[str, str] = {}
    for fname in files:
        got.update(hash_safetensors_file(staging / fname))
    want = {n: Fingerprint.from_json({**t, "name": n}) for n, t in expected.items()}
    problems = compare_fingerprints(want, got)
    if problems:
        lines = "\n".join(str(p) for p in problems[:20])
        raise ExportVerificationError(f"read-back of {staging} does not match the tensors computed in memory "
                                      f"({len(problems)} problem(s)); the disk or filesystem corrupted the write:\n"
                                      f"{lines}")


def _version_counters(model: nn.Module) -> dict[str, int]:
    return {n: p._version for n, p in model.named_parameters()}


def _check_unchanged(before: Mapping[str, int], model: nn.Module) -> None:
    """The export read the model over some time; if anything wrote to a parameter meanwhile (a
    training step on another thread), the snapshot mixes two states and must not be published."""
    changed = [n for n, v in _version_counters(model).items() if before.get(n, v) != v]
    if changed:
        raise ExportVerificationError(
            f"{len(changed)} parameter(s) were modified while the export was reading the model, e.g. "
            f"{changed[:5]}; the snapshot would mix two training states and was not published. Export when no "
            "optimizer step can run (HFExportHook does), or export from a copy.")


def _record(effect: TrainingEffect, name: str, role: str, merged, sources, trained: FingerprintSet,
            baseline: Mapping[str, Fingerprint] | None) -> None:
    if role == ROLE_FROZEN:
        effect.frozen_tensors += 1
        return
    effect.trained_tensors += 1
    differs = merged.differs_from_base
    if role == ROLE_TRAINABLE and baseline is not None:
        src = sources[0]
        if src in baseline and src in trained.tensors:
            differs = baseline[src].digest != trained.tensors[src].digest
    if role == ROLE_LORA and merged.delta_rel_norm is not None:
        effect.lora_rel_delta[name] = merged.delta_rel_norm
    if differs is None:
        effect.trained_unknown_base.append(name)
    elif differs:
        effect.trained_differ_from_base += 1
    else:
        effect.trained_identical_to_base.append(name)


def export_hf(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto", dtype: Any = None,
              max_shard_size: int | str = "5GB", provenance: Mapping | None = None,
              baseline: Mapping[str, Fingerprint] | None = None, overwrite: bool = False,
              readback: bool = True, progress: bool = False,
              trained: FingerprintSet | None = None) -> ExportManifest:
    """Merge, write and verify an HF snapshot of ``model`` without changing it.

    ``model`` may be a PreTrainedModel, a PeftModel, xtuner's SupervisedFinetune or a
    Sa2VA-shaped training model. ``dtype`` (e.g. ``"bf16"``) is the dtype of the floating
    tensors in the files; ``None`` keeps each as in memory. ``baseline`` holds the trainable
    parameters' fingerprints from before training (FingerprintHook records them), so that
    directly trained tensors can be told apart from untouched ones. Returns the manifest
    that was written into the snapshot. ``trained`` may pass the trainable parameters'
    fingerprints when the caller has just computed them for this exact state (FingerprintHook
    at the same checkpoint), so they are not hashed twice.
    """
    out_dir = Path(out_dir)
    dt = parse_dtype(dtype)
    conv = resolve_converter(converter, model)
    versions = _version_counters(model)
    walk = plan_merged_tensors(conv.hf_root(model))
    names = conv.map_keys([st.name for st in walk.tensors])
    kept = [(names[st.name], st) for st in walk.tensors if names[st.name] is not None]
    dropped = {st.name: f"dropped by converter '{conv.name}'" for st in walk.tensors if names[st.name] is None}
    renamed = {st.name: names[st.name] for st in walk.tensors if names[st.name] not in (None, st.name)}
    by_name = dict(kept)
    plan = plan_shards([TensorSlot(n, st.shape, st.out_dtype(dt)) for n, st in kept], max_shard_size)
    weight_map = plan.weight_map
    trained = trained if trained is not None else trained_fingerprints(model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out_dir.parent, int(plan.total_size * 1.02) + (16 << 20))
    staging = staging_dir_for(out_dir)
    staging.mkdir()
    try:
        tensors: dict[str, dict] = {}
        effect = TrainingEffect()
        bar = _progress(plan.total_size, progress)

        stager = HostStager()

        def produce(slot: TensorSlot) -> torch.Tensor:
            st = by_name[slot.name]
            merged = st.materialize(dt)
            host = stager.to_host(merged.tensor)
            fp = fingerprint_tensor(slot.name, merged.tensor, host=host)
            role = merged.role or st.role
            tensors[slot.name] = {**{k: v for k, v in fp.to_json().items() if k != "name"},
                                  "file": weight_map[slot.name], "role": role, "sources": list(st.sources)}
            _record(effect, slot.name, role, merged, st.sources, trained, baseline)
            bar.update(slot.nbytes)
            return host

        write_shards(staging, plan, produce)
        bar.close()
        ctx = SnapshotContext(model=model, dtype=dt, names=set(by_name), notes=[])
        ctx.notes += [f"adapter '{a}' is present on {len(mods)} module(s) (e.g. {mods[0]}) but not active, so it "
                      "was not merged" for a, mods in sorted(walk.inactive.items())]
        if walk.dequantized:
            ctx.notes.append(f"base dequantized: {len(walk.dequantized)} quantized (bitsandbytes) module(s), e.g. "
                             f"{walk.dequantized[0]}, were dequantized and merged in fp32, then written as "
                             f"{dt or 'float32'}")
        cfg = conv.hf_config(model, ctx)
        if isinstance(cfg, dict):
            write_json(staging / "config.json", cfg)
        else:
            cfg.save_pretrained(str(staging))
        conv.save_extras(model, staging, ctx)
        if readback:
            _readback(staging, [f for f, _ in plan.files], tensors)
        files = {rel: {"size": size} | ({} if rel.endswith(".safetensors") else {"sha256": sha256_file(staging / rel)})
                 for rel, size in file_entries(staging, exclude=[MANIFEST_FILE]).items()}
        manifest = ExportManifest(
            converter=conv.name, dtype=str(dt).removeprefix("torch.") if dt else "as_in_memory",
            tensors=dict(sorted(tensors.items())),
            root_digest=root_digest({n: t["digest"] for n, t in tensors.items()}),
            files=files, trained=trained.to_json(), training_effect=effect.to_json(),
            provenance={**(provenance or {}), "versions": package_versions(),
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            tied=walk.tied, dropped=dropped, renamed=renamed, notes=ctx.notes, readback_verified=readback)
        write_json(staging / MANIFEST_FILE, manifest.to_json())
        _check_unchanged(versions, model)
        publish(staging, out_dir, overwrite=overwrite)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not enabled)
