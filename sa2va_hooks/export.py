"""``export_hf``: the one path from an in-memory model to a verified HF snapshot.

The hooks and ``tools/export.py`` both call this, so an in-loop export and an offline
re-export of the same weights give the same root digest.
"""
from __future__ import annotations

import datetime
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .converters.base import SnapshotContext, resolve_converter
from .core.fingerprint import (Fingerprint, FingerprintSet, compare_fingerprints, fingerprint_tensor,
                               root_digest)
from .core.host import HostStager
from .core.manifest import MANIFEST_FILE, ExportManifest, TrainingEffect, package_versions, sha256_file
from .core.merge import ROLE_FROZEN, ROLE_LORA, ROLE_TRAINABLE, NonFiniteError, non_finite_names, plan_merged_tensors
from .core.verify import hash_safetensors_file
from .core.dist import RankFailedError, RankFailure, RankGroup, agree, describe
from .core.sharding import (ShardedTensorError, check_full, gathered, is_partitioned, iter_whole_parameters, needs_gather,
                            refuse_unsupported_sharding)
from .core.writer import (ShardWriter, TensorSlot, assign_shards, check_free_space, file_entries, plan_shards, publish,
                          staging_dir_for, write_index, write_json)

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


def fingerprint_whole(model: nn.Module, keep, group: RankGroup | None = None) -> dict[str, Fingerprint]:
    """Fingerprints of the parameters ``keep`` accepts, each read whole (gathered one module at a
    time under ZeRO-3). Collective: every rank walks the same modules; rank r hashes every
    ``world``-th tensor and the results are exchanged, so the work is split and the answer is the
    same on every rank and for every world size. An empty or partial tensor is an error."""
    group = group or RankGroup.current()
    stager = HostStager()
    mine: dict[str, dict] = {}
    error: BaseException | None = None
    for i, (name, p) in enumerate(iter_whole_parameters(model, keep)):
        if error is not None or i % group.world != group.rank:
            continue
        try:
            check_full(name, p)
            host = stager.to_host(p.detach())
            if is_partitioned(p) and host.data_ptr() == p.data_ptr():
                # hashing goes through numpy, which pins the storage (not resizable); the engine must
                # free a gathered CPU parameter's storage when the gather ends, so hash a copy
                host = host.clone()
            mine[name] = fingerprint_tensor(name, p, host=host).to_json()
        except Exception as e:  # noqa: BLE001 - reported collectively below, so no rank is left waiting
            error = e
    agree(group, error, "fingerprinting the model")
    return {n: Fingerprint.from_json(fp) for part in group.all_gather(mine) for n, fp in part.items()}


def trained_fingerprints(model: nn.Module, group: RankGroup | None = None) -> FingerprintSet:
    """Fingerprints of every trainable parameter under its training-time (checkpoint) name."""
    return FingerprintSet.of(fingerprint_whole(model, lambda p: p.requires_grad, group))


def frozen_root(model: nn.Module, group: RankGroup | None = None) -> str:
    """One digest over every frozen parameter: catches a changed base model or pretrained_pth."""
    return FingerprintSet.of(fingerprint_whole(model, lambda p: not p.requires_grad, group)).root


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
              trained: FingerprintSet | None = None, group: RankGroup | None = None) -> ExportManifest:
    """Merge, write and verify an HF snapshot of ``model`` without changing it.

    ``model`` may be a PreTrainedModel, a PeftModel, xtuner's SupervisedFinetune or a
    Sa2VA-shaped training model. ``dtype`` (e.g. ``"bf16"``) is the dtype of the floating
    tensors in the files; ``None`` keeps each as in memory. ``baseline`` holds the trainable
    parameters' fingerprints from before training (FingerprintHook records them), so that
    directly trained tensors can be told apart from untouched ones. Returns the manifest
    that was written into the snapshot. ``trained`` may pass the trainable parameters'
    fingerprints when the caller has just computed them for this exact state (FingerprintHook
    at the same checkpoint), so they are not hashed twice.

    Collective when ``torch.distributed`` is initialised (``group`` defaults to every rank):
    every rank must call it. The shards are split between the ranks; each rank merges, hashes,
    writes and reads back its own into one shared staging directory; rank 0 writes the index,
    config and manifest and publishes only after every rank reported success. Under ZeRO-3 each
    module is gathered by all ranks together, one at a time. Any rank's failure raises
    :class:`RankFailedError` on every rank, naming the rank and the cause, and nothing is
    published. Pass ``group=RankGroup(0, 1)`` to export from one process that holds whole weights.
    """
    group = group or RankGroup.current()
    out_dir = Path(out_dir)
    dt = parse_dtype(dtype)
    conv = resolve_converter(converter, model)
    refuse_unsupported_sharding(model)
    versions = _version_counters(model)
    walk = plan_merged_tensors(conv.hf_root(model))
    names = conv.map_keys([st.name for st in walk.tensors])
    kept = [(names[st.name], st) for st in walk.tensors if names[st.name] is not None]
    _refuse_empty(kept)
    plan = plan_shards([TensorSlot(n, st.shape, st.out_dtype(dt)) for n, st in kept], max_shard_size)
    trained = trained if trained is not None else trained_fingerprints(model, group)
    staging = _open_staging(out_dir, plan, group)
    try:
        work = _RankWork(model, dict(kept), plan, dt, trained, baseline, group, progress)
        error = work.run(staging, readback)
        if error is None:
            error = _changed_error(versions, model)
        agree(group, error, f"export of {out_dir}")
        parts = group.all_gather((work.tensors, work.effect))
        provenance = {**(provenance or {}), "ranks": group.world,
                      "shard_writers": {f: work.owners[f] for f, _ in plan.files}}
        manifest_json, failure = None, None
        if group.is_main:
            try:
                manifest_json = _finish(model, conv, walk, names, kept, plan, dt, parts, staging, out_dir,
                                        trained, provenance, overwrite, readback, versions).to_json()
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, below
                failure = e
        agree(group, failure, f"publishing {out_dir}")
        return ExportManifest.from_json(group.broadcast(manifest_json))
    except BaseException:
        if group.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _refuse_empty(kept: list) -> None:
    """An empty tensor is never a trained weight: under ZeRO-3 it is what a partitioned
    parameter looks like outside a gather. Refuse before writing anything."""
    empty = [n for n, st in kept if 0 in st.shape]
    if empty:
        raise ShardedTensorError(f"{len(empty)} tensor(s) would be exported with no elements, e.g. {empty[:5]}; an "
                                 "export of empty tensors holds nothing that was trained, so none was written.")


def _open_staging(out_dir: Path, plan, group: RankGroup) -> Path:
    """Rank 0 creates the staging directory with a token in it; every other rank must read the
    same token there, or the export directory is not on a filesystem all ranks share."""
    token = uuid.uuid4().hex
    made: tuple[str, str] | str | BaseException
    if group.is_main:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(out_dir.parent, int(plan.total_size * 1.02) + (16 << 20))
            staging = staging_dir_for(out_dir)
            staging.mkdir()
            (staging / _TOKEN).write_text(token)
            made = (str(staging), token)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, below
            made = e
    else:
        made = ""
    if isinstance(made, BaseException) and group.world == 1:
        raise made
    made = group.broadcast(describe(made) if isinstance(made, BaseException) else made)
    if isinstance(made, str):
        raise RankFailedError([RankFailure(0, made)], f"export of {out_dir}")
    staging, token = Path(made[0]), made[1]
    error = None
    if not group.is_main:
        try:
            seen = (staging / _TOKEN).read_text()
        except OSError as e:
            seen = f"unreadable ({e})"
        if seen != token:
            error = (f"cannot see the staging directory {staging} that rank 0 created (token {seen!r}): the export "
                     "directory is not on a filesystem shared by all ranks (multi-node without shared storage?). "
                     "Set HFExportHook(out_dir=...) to a directory every node mounts. Nothing was published.")
    try:
        agree(group, error, f"export of {out_dir}")
    except RankFailedError:
        if group.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if group.is_main:
        (staging / _TOKEN).unlink()
    return staging


_TOKEN = ".sa2va_hooks_rank_check"


class _RankWork:
    """This rank's share of an export: the shards it owns, written in plan order. Under ZeRO-3
    it also takes part in the gathers of every other tensor, so that all ranks enter the same
    collectives in the same order; after a failure it keeps doing so, writing nothing."""

    def __init__(self, model, by_name, plan, dt, trained, baseline, group: RankGroup, progress: bool) -> None:
        self.by_name, self.plan, self.dt = by_name, plan, dt
        self.trained, self.baseline, self.group = trained, baseline, group
        self.collective = needs_gather(model)
        self.owners = assign_shards(plan, group.world)
        self.tensors: dict[str, dict] = {}
        self.effect = TrainingEffect()
        self.stager = HostStager()
        self.bar = _progress(plan.total_size, progress and group.is_main)

    def run(self, staging: Path, readback: bool) -> BaseException | None:
        error: BaseException | None = None
        mine = []
        for fname, slots in self.plan.files:
            own = self.owners[fname] == self.group.rank
            if not (own or self.collective):
                continue
            writer = None
            if own and error is None:
                try:
                    writer = ShardWriter(staging / fname, slots)
                    mine.append(fname)
                except Exception as e:  # noqa: BLE001
                    error = e
            for slot in slots:
                st = self.by_name[slot.name]
                with gathered(st.gather if self.collective or own else ()):
                    if writer is not None and error is None:
                        try:
                            writer.append(slot, self._produce(slot, st, fname))
                        except Exception as e:  # noqa: BLE001
                            error = e
            if writer is not None:
                if error is None:
                    try:
                        writer.close()
                    except Exception as e:  # noqa: BLE001
                        error = e
                else:
                    writer.abort()
        self.bar.close()
        if error is None and readback:
            try:
                _readback(staging, mine, {n: t for n, t in self.tensors.items() if t["file"] in mine})
            except Exception as e:  # noqa: BLE001
                error = e
        return error

    def _produce(self, slot: TensorSlot, st, fname: str) -> torch.Tensor:
        merged = st.materialize(self.dt)
        check_full(slot.name, merged.tensor, slot.shape)
        _check_finite(slot.name, merged.tensor, st, self.dt)
        host = self.stager.to_host(merged.tensor)
        fp = fingerprint_tensor(slot.name, merged.tensor, host=host)
        role = merged.role or st.role
        self.tensors[slot.name] = {**{k: v for k, v in fp.to_json().items() if k != "name"},
                                   "file": fname, "role": role, "sources": list(st.sources)}
        _record(self.effect, slot.name, role, merged, st.sources, self.trained, self.baseline)
        self.bar.update(slot.nbytes)
        return host


def _check_finite(name: str, out: torch.Tensor, st, dt) -> None:
    """Every exported tensor is checked after the cast (merged, saved copies, trained, frozen): a
    NaN or Inf is refused, saying whether memory or the cast to the export dtype produced it."""
    if not non_finite_names([(name, out)]):
        return
    in_memory = non_finite_names([(name, st.materialize(None).tensor)])
    cause = ("it is NaN/Inf in memory: training diverged, check the loss and the learning rate" if in_memory else
             f"it is finite in memory, but the cast to {str(out.dtype).removeprefix('torch.')} overflowed: export in "
             "a wider dtype (dtype='bf16' or 'fp32')")
    raise NonFiniteError(f"tensor '{name}' ({st.role}) would be written with NaN or Inf values; {cause}. Nothing was "
                         "published.")


def _changed_error(versions: Mapping[str, int], model: nn.Module) -> BaseException | None:
    try:
        _check_unchanged(versions, model)
    except ExportVerificationError as e:
        return e
    return None


def _finish(model, conv, walk, names, kept, plan, dt, parts, staging: Path, out_dir: Path, trained,
            provenance, overwrite: bool, readback: bool, versions: Mapping[str, int]) -> ExportManifest:
    """Rank 0, after every rank wrote and read back its shards: index, config, extras,
    manifest, publish."""
    tensors: dict[str, dict] = {}
    effect = TrainingEffect()
    for rank_tensors, rank_effect in parts:
        tensors.update(rank_tensors)
        effect.absorb(rank_effect)
    missing = sorted({n for n, _ in kept} - set(tensors))
    if missing:
        raise ExportVerificationError(f"{len(missing)} planned tensor(s) were written by no rank, e.g. {missing[:5]}")
    write_index(staging, plan)
    by_name = dict(kept)
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
    files = {rel: {"size": size} | ({} if rel.endswith(".safetensors") else {"sha256": sha256_file(staging / rel)})
             for rel, size in file_entries(staging, exclude=[MANIFEST_FILE]).items()}
    dropped = {st.name: f"dropped by converter '{conv.name}'" for st in walk.tensors if names[st.name] is None}
    renamed = {st.name: names[st.name] for st in walk.tensors if names[st.name] not in (None, st.name)}
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


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not enabled)
