"""The export pipeline: from an in-memory model and a converter to a verified, load-checked,
published HF snapshot.

    plan      walk the model (merge plan, tied copies), name every tensor (converter), shard
    write     each rank merges, checks (whole, finite), stages, hashes and writes its shards,
              then reads them back with verify's code
    finish    rank 0: index, config and extras (converter), load check, manifest, verify of the
              staged snapshot, atomic publish

``sa2va_hooks.export`` resolves the converter ("auto", a name, a dict) and calls this; the hooks
and ``tools/export.py`` go through it, so an in-loop export and an offline re-export of the same
weights give the same root digest. The converter is any object with the :class:`Converter`
protocol below; this module imports no converter and no mmengine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from safetensors import SafetensorError
from torch import nn

from .entry import ProducedTensor, TensorEntry, TensorRecord, nbytes_of
from .observer import NO_OBSERVER, ExportObserver
from .fingerprint import Fingerprint, FingerprintSet, digest_tensor, fingerprint_tensor, root_digest, tensor_stats
from .host import HostStager, reserve
from .loadcheck import check_snapshot_loads
from .manifest import MANIFEST_FILE, ExportManifest, TrainingEffect, package_versions, sha256_file
from .merge import (ROLE_FROZEN, ROLE_LORA, ROLE_TRAINABLE, MergedTensor, NonFiniteError, WalkResult, non_finite_names,
                    plan_merged_tensors)
from .verify import check_shard_data, hash_safetensors_file, header_sha256, verify_snapshot
from .dist import RankFailedError, RankFailure, RankGroup, agree, describe
from .sharding import (ShardedTensorError, UnsupportedShardingError, check_full, gathered, is_partitioned,
                            iter_whole_parameters, logical_shape, needs_gather, refuse_unsupported_sharding)
from .snapshot import Capture, ModelChangedError, SnapshotBuffers, live, substituted
from .workers import Workers
from .writer import (ShardPlan, ShardWriter, assign_shards, check_free_space, file_entries, is_regular_file,
                          link_shard, os_error_words, plan_shard_groups, publish, safetensors_header, staging_dir_for,
                          with_path, write_index, write_json)
from .errors import BadValueError, ExportFailedError, InternalError, MismatchError
from .vocab import EXPORT_DTYPES, KEEP_DTYPE

_DTYPES = {spelling: getattr(torch, name) for spelling, name in EXPORT_DTYPES.items()}


@dataclasses.dataclass
class SnapshotContext:
    """What converters need to know about the export being written."""

    model: nn.Module
    dtype: Any  # torch.dtype or None (kept as in memory)
    names: set[str]  # exported tensor names
    notes: list[str]
    # the dtype each exported tensor has in the files: with ``dtype=None`` the config declares what
    # is really there, not the base model's dtype
    file_dtypes: dict[str, torch.dtype] = dataclasses.field(default_factory=dict)


class Converter(Protocol):
    """What the pipeline asks of a converter (``sa2va_hooks.converters.base.Converter`` implements it)."""

    name: str
    template_table: str | None
    required_tokens: Sequence[str]

    def hf_root(self, model: nn.Module) -> nn.Module: ...
    def ensure_ready(self, model: nn.Module) -> None: ...
    def map_keys(self, keys: Sequence[str]) -> dict[str, str | None]: ...
    def writes_tied(self, hf_name: str) -> bool: ...
    def hf_config(self, model: nn.Module, ctx: SnapshotContext) -> Any: ...
    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None: ...


class ExportVerificationError(MismatchError, RuntimeError):
    """What was read back from disk is not what was computed in memory."""


def parse_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in KEEP_DTYPE:
        return None
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise BadValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto' (keep as in memory)") \
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
            t = live(p).detach()
            host = stager.to_host(t)
            if is_partitioned(p) and host.data_ptr() == p.data_ptr():
                # hashing goes through numpy, which pins the storage (not resizable); the engine must
                # free a gathered CPU parameter's storage when the gather ends, so hash a copy
                host = host.clone()
            mine[name] = fingerprint_tensor(name, t, host=host).to_json()
        except Exception as e:  # noqa: BLE001 - reported collectively below, so no rank is left waiting
            error = e
    stager.close()
    agree(group, error, "fingerprinting the model")
    return {n: Fingerprint.from_json(fp) for part in group.all_gather(mine) for n, fp in part.items()}


def reserve_staging(model: nn.Module, dtype: Any = None) -> int:
    """Allocate, before training, the pinned buffer that exports stage each tensor through (as
    large as the model's largest tensor in the export dtype), so that the first export costs what
    the next ones do. Returns its size in bytes (0 where nothing is staged: no CUDA)."""
    dt = parse_dtype(dtype)
    largest = 0
    for p in model.parameters():
        largest = max(largest, nbytes_of(logical_shape(p), dt if dt is not None and p.is_floating_point() else p.dtype))
    reserve(largest)
    return largest if torch.cuda.is_available() else 0


def trained_fingerprints(model: nn.Module, group: RankGroup | None = None) -> FingerprintSet:
    """Fingerprints of every trainable parameter under its training-time (checkpoint) name."""
    return FingerprintSet.of(fingerprint_whole(model, lambda p: p.requires_grad, group))


def frozen_root(model: nn.Module, group: RankGroup | None = None) -> str:
    """One digest over every frozen parameter: catches a changed base model or pretrained_pth."""
    return FingerprintSet.of(fingerprint_whole(model, lambda p: not p.requires_grad, group)).root


def _readback(staging: Path, files: list[str], expected: Mapping[str, dict]) -> None:
    """A rank's own shards, read back with verify's code, against what it computed in memory."""
    problems, _ = check_shard_data(staging, expected, files)
    if problems:
        lines = "\n".join(problems[:20])
        raise ExportVerificationError(f"read-back of {staging} does not match the tensors computed in memory "
                                      f"({len(problems)} problem(s)); the disk or filesystem corrupted the write:\n"
                                      f"{lines}")


def _verify_staged(staging: Path, out_dir: Path) -> None:
    """The staged snapshot, manifest included, through verify (files, index, config sizes, every
    shard header); the tensor data was read back by each rank already."""
    problems = verify_snapshot(staging, data=False)
    if problems:
        raise ExportVerificationError(f"the snapshot for {out_dir} fails verify before publishing "
                                      f"({len(problems)} problem(s)):\n" + "\n".join(problems[:20]))


def _count_effect(effect: TrainingEffect, produced: ProducedTensor, trained: FingerprintSet,
                  baseline: Mapping[str, Fingerprint] | None) -> None:
    """Count one written tensor into what training did, by its final role."""
    name, role = produced.entry.name, produced.role
    if role == ROLE_FROZEN:
        effect.frozen_tensors += 1
        return
    effect.trained_tensors += 1
    differs = produced.differs_from_base
    if role == ROLE_TRAINABLE and baseline is not None:
        src = produced.entry.sources[0]
        if src in baseline and src in trained.tensors:
            differs = baseline[src].digest != trained.tensors[src].digest
    if role == ROLE_LORA and produced.delta_rel_norm is not None:
        effect.lora_rel_delta[name] = produced.delta_rel_norm
    if differs is None:
        effect.trained_unknown_base.append(name)
    elif differs:
        effect.trained_differ_from_base += 1
    else:
        effect.trained_identical_to_base.append(name)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """Everything decided before any tensor is produced. ``entries`` holds each exported tensor's
    :class:`TensorEntry` under its HF name, in export order; ``shards`` holds the same entry objects,
    in write order, each knowing its file. The produced tensors and the manifest's records are
    derived from them; an entry's role is final unless the merge finds a frozen tensor changed by
    a tuner (:meth:`ProducedTensor.of`)."""

    entries: dict[str, TensorEntry]
    shards: ShardPlan  # of TensorEntry
    tied: dict[str, str]  # training name not written (tied on load) -> the name written
    dropped: dict[str, str]  # training name -> why it is not exported
    renamed: dict[str, str]  # training name -> HF name, where they differ
    notes: tuple[str, ...]  # what the walk found that the manifest should say


def plan_export(model: nn.Module, conv: Converter, dt: torch.dtype | None, max_shard_size: int | str) -> ExportPlan:
    ready = getattr(conv, "ensure_ready", None)  # a user's converter may predate it
    if ready is not None:
        ready(model)  # what the converter can tell before a byte is written (remote code, template, tokenizer)
    walk = _untie_for(conv, plan_merged_tensors(conv.hf_root(model)))
    names = conv.map_keys([st.name for st in walk.tensors])
    planned = {names[st.name]: TensorEntry.plan(names[st.name], st, dt)
               for st in walk.tensors if names[st.name] is not None}
    _refuse_empty(planned)
    groups = [[e for e in planned.values() if e.frozen_only], [e for e in planned.values() if not e.frozen_only]]
    shards = ShardPlan([(f, [e.in_file(f) for e in es]) for f, es in plan_shard_groups(groups, max_shard_size).files])
    placed = {e.name: e for _, es in shards.files for e in es}
    entries = {n: placed[n] for n in planned}  # export order; the very objects the shards hold
    notes = [f"adapter '{a}' is present on {len(mods)} module(s) (e.g. {mods[0]}) but not active, so it was not "
             "merged" for a, mods in sorted(walk.inactive.items())]
    if walk.dequantized:
        notes.append(f"base dequantized: {len(walk.dequantized)} quantized (bitsandbytes) module(s), e.g. "
                     f"{walk.dequantized[0]}, were dequantized and merged in fp32, then written as {dt or 'float32'}")
    return ExportPlan(
        entries=entries, shards=shards, tied=walk.tied,
        dropped={st.name: f"dropped by converter '{conv.name}'" for st in walk.tensors if names[st.name] is None},
        renamed={st.name: names[st.name] for st in walk.tensors if names[st.name] not in (None, st.name)},
        notes=tuple(notes))


def _untie_for(conv: Converter, walk: WalkResult) -> WalkResult:
    """Tied parameters are written once, as save_pretrained does, unless the converter says the
    target class will not tie them again on load: those are written as copies of their twin."""
    by_name = {st.name: st for st in walk.tensors}
    copies = [dataclasses.replace(by_name[first], name=name) for name, first in walk.tied.items()
              if conv.writes_tied(conv.map_keys([name])[name] or "")]
    if not copies:
        return walk
    written = {st.name for st in copies}
    return dataclasses.replace(walk, tensors=walk.tensors + copies,
                               tied={k: v for k, v in walk.tied.items() if k not in written})


def export_hf(model: nn.Module, out_dir: str | Path, *, converter: Converter, dtype: Any = None,
              max_shard_size: int | str = "5GB", provenance: Mapping | None = None,
              baseline: Mapping[str, Fingerprint] | None = None, overwrite: bool = False,
              readback: bool = True, progress: bool = False,
              trained: FingerprintSet | None = None, group: RankGroup | None = None,
              link_from: str | Path | None = None, observer: ExportObserver | None = None) -> ExportManifest:
    """Merge, write and verify an HF snapshot of ``model`` without changing it.

    ``model`` may be a PreTrainedModel, a PeftModel, xtuner's SupervisedFinetune or a
    Sa2VA-shaped training model. ``dtype`` (e.g. ``"bf16"``) is the dtype of the floating
    tensors in the files; ``None`` keeps each as in memory. ``baseline`` holds the trainable
    parameters' fingerprints from before training (FingerprintHook records them), so that
    directly trained tensors can be told apart from untouched ones. Returns the manifest
    that was written into the snapshot. ``trained`` may pass the trainable parameters'
    fingerprints when the caller has just computed them for this exact state (FingerprintHook
    at the same checkpoint), so they are not hashed twice. ``link_from`` names an earlier
    complete snapshot: each shard of frozen tensors whose tensors are digest for digest those
    of the same shard there is hard-linked instead of written (written, where it cannot be linked).
    ``observer`` (an :class:`ExportObserver`) is told of each tensor produced and file completed.

    Collective when ``torch.distributed`` is initialised (``group`` defaults to every rank):
    every rank must call it. The shards are split between the ranks; each rank merges, hashes,
    writes and reads back its own into one shared staging directory; rank 0 writes the index,
    config and manifest and publishes only after every rank reported success. Under ZeRO-3 each
    module is gathered by all ranks together, one at a time. Any rank's failure raises
    :class:`RankFailedError` on every rank, naming the rank and the cause, and nothing is
    published. Pass ``group=RankGroup(0, 1)`` to export from one process that holds whole weights.
    """
    return ExportTask(model, out_dir, converter=converter, dtype=dtype, max_shard_size=max_shard_size,
                      provenance=provenance, baseline=baseline, overwrite=overwrite, readback=readback,
                      progress=progress, trained=trained, group=group, link_from=link_from,
                      observer=observer).run()


def start_export(model: nn.Module, out_dir: str | Path, *, capture: Capture | None = None,
                 buffers: SnapshotBuffers | None = None, on_done: Callable[["ExportJob"], None] | None = None,
                 **kwargs: Any) -> "ExportJob":
    """Export in the background: what training changes next (the trainable tensors, the buffers)
    is copied now, into ``buffers`` (reused from one export to the next); the frozen rest is read
    by a thread while the caller goes on, and its version counters must be unchanged at the end
    or nothing is published. Returns the running :class:`ExportJob`; its snapshot holds exactly
    the weights of this moment. Takes :func:`export_hf`'s keyword arguments; ``group`` must then
    be a group only background exports use (``RankGroup.background()``)."""
    job = prepare_background_export(model, out_dir, capture=capture, buffers=buffers, on_done=on_done, **kwargs)
    return job.start()


def prepare_gathered_export(model: nn.Module, out_dir: str | Path, *,
                            on_done: Callable[["ExportJob"], None] | None = None, **kwargs: Any) -> "ExportJob":
    """For partitioned parameters (ZeRO-3, FSDP): a job whose thread writes what the training
    thread then gathers and stages with ``job.task.gather_in_front(group, budget)`` (start the
    job first). The stall is the gathers and the copies to the host; the writes, read-back and
    publishing are in the background."""
    task = ExportTask(model, out_dir, **kwargs)
    task.expects_front()
    return ExportJob(task, on_done)


def prepare_background_export(model: nn.Module, out_dir: str | Path, *, capture: Capture | None = None,
                              buffers: SnapshotBuffers | None = None,
                              on_done: Callable[["ExportJob"], None] | None = None, **kwargs: Any) -> "ExportJob":
    """The synchronous half of :func:`start_export` (plan and capture), not started yet: a
    multi-rank caller agrees that every rank got this far before any rank starts its thread."""
    if needs_gather(model):
        raise UnsupportedShardingError(
            "a background export reads the frozen tensors while training goes on, but this model's parameters are "
            "partitioned (DeepSpeed ZeRO-3 or FSDP), so only a collective gather can read them; use the synchronous "
            "export_hf (HFExportHook does so automatically under ZeRO-3 and FSDP).")
    if capture is None:
        capture = (buffers or SnapshotBuffers()).capture(model)
    return ExportJob(ExportTask(model, out_dir, capture=capture, **kwargs), on_done)


class ExportTask:
    """One export: planned at construction (names, shapes, shards: no tensor data is produced),
    carried out by :meth:`run`, in this thread or another."""

    def __init__(self, model: nn.Module, out_dir: str | Path, *, converter: Converter, dtype: Any = None,
                 max_shard_size: int | str = "5GB", provenance: Mapping | None = None,
                 baseline: Mapping[str, Fingerprint] | None = None, overwrite: bool = False,
                 readback: bool = True, progress: bool = False, trained: FingerprintSet | None = None,
                 group: RankGroup | None = None, link_from: str | Path | None = None,
                 capture: Capture | None = None, observer: ExportObserver | None = None) -> None:
        self.model, self.out_dir = model, Path(out_dir)
        # first, before anything can raise: every rank opens the same session, in the same order
        self.group = (group or RankGroup.current()).session(self.out_dir.name)
        self.dt = parse_dtype(dtype)
        self.conv = converter
        refuse_unsupported_sharding(model)
        self.capture = capture or Capture.nothing(model)
        self.export_plan = plan_export(model, converter, self.dt, max_shard_size)
        self.plan = self.export_plan.shards
        self.provenance, self.baseline, self.trained = dict(provenance or {}), baseline, trained
        self.overwrite, self.readback, self.progress = overwrite, readback, progress
        self.link_from = Path(link_from) if link_from else None
        self.observer = observer or NO_OBSERVER
        self._front_ready: threading.Event | None = None
        self._front: tuple | BaseException | None = None
        self._abandoned = False

    def abandon_front(self) -> None:
        """This task's thread has ended: the training thread must not wait for it to take more."""
        self._abandoned = True
        if isinstance(self._front, tuple):
            self._front[3].abandon()

    def run(self) -> ExportManifest:
        with substituted(self.capture if self.capture.background else None):
            return self._run()

    # -- partitioned parameters: gathered in the training thread, written by this task's thread --
    def gather_in_front(self, front: RankGroup, budget: int) -> None:
        """Training thread, for ZeRO-3 / FSDP parameters, while :meth:`run` works on another thread:
        every rank enters the gathers (over ``front``, the training's own group) and hands private
        host copies of the tensors it writes to the writer thread, at most ``budget`` bytes ahead
        of it. Returns when every gather is done; the writing, read-back and publishing go on
        in the background."""
        self._front_ready = self._front_ready or threading.Event()
        t0 = time.perf_counter()
        try:
            trained = self.trained if self.trained is not None else trained_fingerprints(self.model, front)
            staging = _open_staging(self.out_dir, self.plan, front)
        except BaseException as e:
            self._front = e
            self._front_ready.set()
            raise
        work = _RankWork(self.model, self.plan, trained, self.baseline, self.group, self.progress,
                         observer=self.observer)
        queue = _ByteQueue(budget, self.group.timeout_s)
        if self._abandoned:
            queue.abandon()
        self._front = (trained, staging, work, queue)
        self._front_ready.set()

        def paused() -> None:  # recorded before the writer can finish (it waits for the close)
            self.provenance["training_paused_s"] = round(time.perf_counter() - t0, 4)

        work.produce_into(queue, before_close=paused)
        if queue.before_close and self.group.is_main:  # nobody else will remove it
            shutil.rmtree(staging, ignore_errors=True)

    def expects_front(self) -> None:
        """This task's tensors will come from :meth:`gather_in_front`; :meth:`run` waits for them."""
        self._front_ready = threading.Event()
        self.capture = Capture({}, {}, {}, 0)  # everything is read in the front, while no step runs
        self.provenance["background"] = True

    def _run(self) -> ExportManifest:
        group, out_dir = self.group, self.out_dir
        if self._front_ready is not None:
            self._front_ready.wait()
            if isinstance(self._front, BaseException):
                raise FrontFailedError(f"the gathers of {out_dir} failed in the training thread: "
                                       f"{describe(self._front)}") from self._front
            trained, staging, work, queue = self._front
            try:
                error = work.consume(staging, queue, self.readback)
            except Exception as e:  # noqa: BLE001 - taken to the agreement: no rank may skip it
                error = e
            return self._conclude(trained, staging, work, error)
        trained = self.trained if self.trained is not None else trained_fingerprints(self.model, group)
        previous = _Previous.load(self.link_from)
        staging = _open_staging(out_dir, self.plan, group)
        work = None
        try:
            work = _RankWork(self.model, self.plan, trained, self.baseline, group, self.progress, previous,
                             self.observer)
            error = work.run(staging, self.readback)
        except Exception as e:  # noqa: BLE001 - taken to the agreement: no rank may skip it
            error = e
            if work is not None:
                work.close()
        return self._conclude(trained, staging, work, error)

    def _conclude(self, trained, staging: Path, work: "_RankWork | None", error: BaseException | None
                  ) -> ExportManifest:
        """Every rank: agree on success, then rank 0 finishes, publishes and tells the others. That
        last step is one-way: once rank 0 has published it reports success whatever became of the
        other ranks since they sent their records (it never waits for them again)."""
        group, out_dir = self.group, self.out_dir
        try:
            if error is None:
                error = _changed_error(self.capture)
            agree(group, error, f"export of {out_dir}")
            parts = group.all_gather((work.tensors, work.effect, work.storage()))
            provenance = {"background": self.capture.background, **self.provenance, "ranks": group.world,
                          "shard_writers": {f: work.owners[f] for f, _ in self.plan.files}}
            result = None
            if group.is_main:
                try:
                    result = ("published", self._finish(parts, staging, trained, provenance).to_json())
                except Exception as e:  # noqa: BLE001 - every rank must learn of it, below
                    if group.world == 1:
                        raise
                    result = ("failed", describe(e))
            status, payload = group.broadcast(result)
            if status != "published":
                raise RankFailedError([RankFailure(0, payload)], f"publishing {out_dir}")
            return ExportManifest.from_json(payload)
        except BaseException:
            if group.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise

    def _finish(self, parts, staging: Path, trained, provenance) -> ExportManifest:
        """Rank 0, after every rank wrote and read back its shards: index, config and extras, load
        check, manifest, verify of the staged snapshot, publish."""
        ep = self.export_plan
        tensors, effect, storage = _merge_rank_parts(parts, ep)
        write_index(staging, ep.shards)
        notes = self._write_config_and_extras(staging)
        files = _file_records(staging)
        storage["bytes_written"] += sum(v["size"] for k, v in files.items() if not k.endswith(".safetensors"))
        load_check = check_snapshot_loads(staging, tensors, template_table=self.conv.template_table,
                                          required_tokens=self.conv.required_tokens, label=self.out_dir)
        manifest = ExportManifest(
            converter=self.conv.name, dtype=str(self.dt).removeprefix("torch.") if self.dt else "as_in_memory",
            tensors=dict(sorted(tensors.items())),
            root_digest=root_digest({n: t["digest"] for n, t in tensors.items()}),
            files=files, trained=trained.to_json(), training_effect=effect.to_json(),
            provenance={**provenance, "versions": package_versions(), "load_check": load_check,
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            tied=ep.tied, dropped=ep.dropped, renamed=ep.renamed, notes=notes, readback_verified=self.readback,
            storage=storage)
        write_json(staging / MANIFEST_FILE, manifest.to_json())
        _verify_staged(staging, self.out_dir)
        self.capture.check_unchanged("the export")
        self.group.raise_if_abandoned()  # a rank that gave up has logged a failure: do not contradict it
        publish(staging, self.out_dir, overwrite=self.overwrite)
        return manifest

    def _write_config_and_extras(self, staging: Path) -> list[str]:
        """The converter's config.json and extras (tokenizer, processor, remote code); returns the notes."""
        ctx = SnapshotContext(model=self.model, dtype=self.dt, names=set(self.export_plan.entries),
                              notes=list(self.export_plan.notes),
                              file_dtypes={n: e.dtype for n, e in self.export_plan.entries.items()})
        cfg = self.conv.hf_config(self.model, ctx)
        try:
            if isinstance(cfg, dict):
                write_json(staging / "config.json", cfg)
            else:
                cfg.save_pretrained(str(staging))
            self.conv.save_extras(self.model, staging, ctx)
        except OSError as e:  # transformers' writers name no file on ENOSPC: at least the directory
            raise with_path(e, staging) from None
        return ctx.notes


def _merge_rank_parts(parts, ep: ExportPlan) -> tuple[dict[str, dict], TrainingEffect, dict]:
    """Every rank's tensor records, training effect and storage counts, as one; every planned
    tensor must have been written by some rank."""
    tensors: dict[str, dict] = {}
    effect = TrainingEffect()
    storage = {"bytes_written": 0, "bytes_linked": 0, "linked_from": {}}
    for rank_tensors, rank_effect, rank_storage in parts:
        tensors.update({n: r.to_json() for n, r in rank_tensors.items()})
        effect.absorb(rank_effect)
        storage["bytes_written"] += rank_storage["bytes_written"]
        storage["bytes_linked"] += rank_storage["bytes_linked"]
        storage["linked_from"].update(rank_storage["linked_from"])
    missing = sorted(set(ep.entries) - set(tensors))
    if missing:
        raise ExportVerificationError(f"{len(missing)} planned tensor(s) were written by no rank, e.g. {missing[:5]}")
    return tensors, effect, storage


def _file_records(staging: Path) -> dict[str, dict]:
    """Size of every file; for shards the sha256 of the header (the data is covered by the tensor
    digests), for the rest the sha256 of the whole file."""
    return {rel: {"size": size} | ({"header_sha256": header_sha256(staging / rel)} if rel.endswith(".safetensors")
                                   else {"sha256": sha256_file(staging / rel)})
            for rel, size in file_entries(staging, exclude=[MANIFEST_FILE]).items()}


class FrontFailedError(ExportFailedError, RuntimeError):
    """The training-thread half of an export failed; the training thread reported it already."""


class _ByteQueue:
    """Tensors handed from the training thread to the writer thread, holding at most ``budget``
    bytes at a time (a single tensor larger than that still passes, alone)."""

    def __init__(self, budget: int, timeout_s: float | None = None) -> None:
        self.budget, self.used, self.timeout_s = budget, 0, timeout_s
        self.items: list = []
        self.closed, self.error = False, None
        self.abandoned = self.before_close = False
        self.cond = threading.Condition()

    def abandon(self) -> None:
        """The writer will take nothing more: puts return at once, dropping their items."""
        with self.cond:
            self.abandoned = True
            self.before_close = not self.closed  # the writer died before the producer finished
            self.items.clear()
            self.cond.notify_all()

    def put(self, item, nbytes: int) -> None:
        with self.cond:
            room = lambda: not self.used or self.used + nbytes <= self.budget or self.abandoned  # noqa: E731
            if not self.cond.wait_for(room, self.timeout_s):
                # the writer is stuck (a hung filesystem): training does not wait longer for it
                self.error = TimeoutError(f"the export's writer took nothing for {self.timeout_s:g} s (a stuck "
                                          "filesystem?); the training thread stopped handing it tensors")
                self.abandoned = self.closed = True
                self.items.clear()
                self.cond.notify_all()
            if self.abandoned:  # the writer is gone: never block the training thread on it
                return
            self.items.append(item)
            self.used += nbytes
            self.cond.notify_all()

    def release(self, nbytes: int) -> None:
        """The consumer is done with an item's bytes."""
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.closed, self.error = True, self.error or error
            self.cond.notify_all()

    def __iter__(self):
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait()
                if not self.items:
                    return
                item = self.items.pop(0)
            yield item


class ExportJob:
    """One export on a thread of its own (not a daemon: the interpreter waits for it at exit, so
    a snapshot being written is finished, not torn). On a GPU it works on a CUDA stream of its
    own, so its copies and merges never queue behind training's kernels."""

    def __init__(self, task: ExportTask, on_done: Callable[["ExportJob"], None] | None = None) -> None:
        self.task, self.on_done = task, on_done
        self.manifest: ExportManifest | None = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._main, name=f"sa2va_hooks-export-{task.out_dir.name}")

    @property
    def out_dir(self) -> Path:
        return self.task.out_dir

    def start(self) -> "ExportJob":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the export; True once it has finished (successfully or not)."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> ExportManifest:
        """Wait, then return the manifest or raise the export's error."""
        self.wait()
        if self.error is not None:
            raise self.error
        if self.manifest is None:
            raise InternalError(f"the export to {self.out_dir} was never started")
        return self.manifest

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            with _own_stream(self.task.model):
                self.manifest = self.task.run()
        except BaseException as e:  # noqa: BLE001 - kept for result() and the callback; a thread has no caller
            self.error = e
        finally:
            self.task.abandon_front()
        self.seconds = time.perf_counter() - t0
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # noqa: BLE001 - a callback bug must not vanish silently
                logging.getLogger("sa2va_hooks").exception("the export's completion callback failed")


def _own_stream(model: nn.Module):
    device = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    if device is None:
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))


class _Previous:
    """The previous complete snapshot of this run: its manifest says which tensors each shard
    holds, with their digests; a shard is reused only when names, order, dtypes, shapes (the
    header, byte for byte) and every digest are equal."""

    def __init__(self, path: Path, manifest: ExportManifest) -> None:
        self.path, self.tensors = path, manifest.tensors

    @classmethod
    def load(cls, path: Path | None) -> "_Previous | None":
        if path is None or not (path / MANIFEST_FILE).is_file():
            return None
        try:
            return cls(path, ExportManifest.load(path))
        except (OSError, ValueError, TypeError, KeyError):
            return None  # unreadable: write everything, as with no previous snapshot

    def same_shard(self, fname: str, slots: Sequence[TensorEntry], digests: Mapping[str, str]) -> bool:
        prev = self.path / fname
        names = {n for n, t in self.tensors.items() if isinstance(t, dict) and t.get("file") == fname}
        if names != {s.name for s in slots} or not is_regular_file(prev):  # a symlink or FIFO: never opened
            return False
        if any(self.tensors[s.name].get("digest") != digests[s.name] for s in slots):
            return False
        header = safetensors_header(slots)
        with open(prev, "rb") as f:
            if f.read(len(header)) != header:
                return False
        return prev.stat().st_size == len(header) + sum(s.nbytes for s in slots)


def _refuse_empty(entries: Mapping[str, TensorEntry]) -> None:
    """An empty tensor is never a trained weight: under ZeRO-3 it is what a partitioned
    parameter looks like outside a gather. Refuse before writing anything."""
    empty = [n for n, e in entries.items() if 0 in e.shape]
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
            check_free_space(out_dir.parent, plan.total_size)
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
    collectives in the same order; after a failure it keeps doing so, writing nothing.

    A shard of frozen tensors is first hashed, tensor by tensor; when every digest equals the
    same shard's in the previous snapshot, that file is hard-linked and read back instead of
    written. Otherwise (or if the linked file does not read back right) it is written."""

    def __init__(self, model: nn.Module, plan: ShardPlan, trained: FingerprintSet,
                 baseline: Mapping[str, Fingerprint] | None, group: RankGroup, progress: bool,
                 previous: "_Previous | None" = None, observer: ExportObserver = NO_OBSERVER) -> None:
        self.plan = plan  # of TensorEntry
        self.observer = observer
        self.trained, self.baseline, self.group = trained, baseline, group
        self.collective = needs_gather(model)
        self.previous = None if self.collective else previous  # linking never changes the gather order
        self.owners = assign_shards(plan, group.world)
        self.tensors: dict[str, TensorRecord] = {}
        self.effect = TrainingEffect()
        self.stager = HostStager()
        self.bar = _progress(plan.total_size, progress and group.is_main)
        self.written = self.linked = 0
        self.linked_from: dict[str, str] = {}
        self._link_errors: set = set()  # errnos already logged by _link_failed
        self._hasher = Workers(1, "sa2va_hooks-hash")
        self._pending: ProducedTensor | None = None  # staged last, its digest still running

    def storage(self) -> dict:
        return {"bytes_written": self.written, "bytes_linked": self.linked, "linked_from": dict(self.linked_from)}

    def run(self, staging: Path, readback: bool) -> BaseException | None:
        error: BaseException | None = None
        mine = []
        for fname, entries in self.plan.files:
            own = self.owners[fname] == self.group.rank
            if not (own or self.collective):
                continue
            if own and error is None and self._linkable(entries):
                try:
                    if self._link(staging, fname, entries):
                        continue
                except Exception as e:  # noqa: BLE001
                    error = e
                    self._drain()
                    continue
            error = self._write(staging, fname, entries, own, error)
            if own and error is None:
                mine.append(fname)
        self.close()
        return self._read_back(staging, mine, error, readback)

    def close(self) -> None:
        """Release the helper thread and the staging buffer; never raises (cleanup must not keep
        a rank from the agreement that follows)."""
        self._drain()
        self._hasher.shutdown()
        for close in (self.bar.close, self.stager.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - see above; the export's own error is what gets reported
                logging.getLogger("sa2va_hooks").debug("cleanup after an export failed", exc_info=True)

    def _read_back(self, staging: Path, mine: list[str], error: BaseException | None,
                   readback: bool) -> BaseException | None:
        """After this rank's writes: read its files back (unless something failed already)."""
        if error is None and readback:
            try:
                _readback(staging, mine, {n: r.to_json() for n, r in self.tensors.items() if r.file in mine})
            except Exception as e:  # noqa: BLE001
                error = e
        return error

    def _linkable(self, entries: list[TensorEntry]) -> bool:
        return self.previous is not None and all(e.frozen_only for e in entries)

    def _link(self, staging: Path, fname: str, entries: list[TensorEntry]) -> bool:
        """Hash the shard's tensors; link the previous snapshot's file when they are equal."""
        for entry in entries:
            self._produce(entry)
            self._settle()
        digests = {e.name: self.tensors[e.name].digest for e in entries}
        src, dst = self.previous.path / fname, staging / fname
        try:
            if not self.previous.same_shard(fname, entries, digests):
                return False
            link_shard(src, dst)
            try:
                same = hash_safetensors_file(dst) == digests
            except (SafetensorError, ValueError, RuntimeError):
                same = False  # not even a safetensors file any more: reported below as changed
        except OSError as e:  # whatever the errno: the shard is written from the model instead
            dst.unlink(missing_ok=True)
            self._link_failed(src, fname, e)
            return False
        if not same:  # the older file was changed after it was published
            dst.unlink()
            logging.getLogger("sa2va_hooks").warning(
                f"{self.previous.path / fname} no longer holds what its manifest says (edited or damaged after it "
                f"was published; `verify {self.previous.path}` will say so); writing {fname} afresh instead")
            return False
        size = dst.stat().st_size
        self.linked += size
        self.observer.file_done(fname, size, linked=True)
        self.linked_from[fname] = f"{self.previous.path.name}/{fname} (linked)"
        return True

    def _link_failed(self, src: Path, fname: str, e: OSError) -> None:
        """A link that failed is a write, never a failed export: no link support (EXDEV, ENOSYS on a
        FUSE mount, EPERM), a file we may not read, one deleted meanwhile, a symlink. The caller writes
        the shard from the model, the source of truth (copying the file we could not link may fail the
        same way). Logged once per export and errno: a filesystem without links fails every shard."""
        key = e.errno if e.errno is not None else type(e).__name__
        level = logging.DEBUG if key in self._link_errors else logging.WARNING
        self._link_errors.add(key)
        logging.getLogger("sa2va_hooks").log(
            level, f"could not hard-link {e.filename or src}: {os_error_words(e)}; writing {fname} from the model "
                   f"instead (the export goes on; other shards that fail the same way are written too, logged at "
                   f"DEBUG)")

    def _write(self, staging: Path, fname: str, entries: list[TensorEntry], own: bool, error: BaseException | None):
        """Write one shard (or, under ZeRO-3, take part in its gathers only); returns the error."""
        record = not any(e.name in self.tensors for e in entries)  # hashed already by a failed _link
        writer = None
        if own and error is None:
            try:
                writer = ShardWriter(staging / fname, entries)
            except Exception as e:  # noqa: BLE001
                error = e
        for entry in entries:
            with gathered(entry.gather if self.collective or own else ()):
                if writer is not None and error is None:
                    try:
                        writer.append(entry, self._produce(entry, record))
                        self._settle()
                    except Exception as e:  # noqa: BLE001
                        error = e
                        self._drain()
        if writer is not None:
            if error is None:
                try:
                    size = writer.close()
                    self.written += size
                    self.observer.file_done(fname, size, linked=False)
                except Exception as e:  # noqa: BLE001
                    error = e
            else:
                writer.abort()
        return error

    def _produce(self, entry: TensorEntry, record: bool = True) -> torch.Tensor:
        """Merge, check and stage one tensor. Its digest is computed on a helper thread while the
        caller writes the staged bytes (both only read them); :meth:`_settle` records it, and
        must be called before the next tensor is staged over this one."""
        merged, host, stats = self._stage(entry, record)
        if stats is not None:
            self._pending = ProducedTensor.of(entry, merged, host, *stats,
                                              digest=self._hasher.submit(digest_tensor, entry.name, host))
        return host

    def _stage(self, entry: TensorEntry, stats: bool) -> tuple[MergedTensor, torch.Tensor, tuple | None]:
        """Merge, check and stage one tensor to the host, with its fp64 norm and sum (computed on
        its device) when ``stats``. The observer sees the start and the end, failed or not."""
        self.observer.tensor_producing(entry)
        try:
            merged = entry.materialize()
            check_full(entry.name, merged.tensor, entry.shape)
            _check_finite(entry, merged.tensor)
            host = self.stager.to_host(merged.tensor)
            return merged, host, tensor_stats(merged.tensor) if stats else None
        finally:
            self.observer.tensor_produced(entry)

    def _settle(self) -> None:
        """Record the tensor staged last (waits for its digest)."""
        if self._pending is None:
            return
        produced, self._pending = self._pending, None
        self._record(produced, produced.digest.result())

    def _record(self, produced: ProducedTensor, digest: str) -> None:
        self.tensors[produced.entry.name] = produced.record(digest)
        _count_effect(self.effect, produced, self.trained, self.baseline)
        self.bar.update(produced.entry.nbytes)

    # -- gathered in the training thread, written in the background (ZeRO-3, FSDP) -------------
    def produce_into(self, queue: "_ByteQueue", before_close: Callable[[], None] = lambda: None) -> None:
        """Training thread: enter every gather in plan order (collective) and queue a private host
        copy of each tensor this rank writes. Blocks while the queue holds its byte budget (the
        writer is behind). After a failure it keeps entering the gathers, queueing nothing."""
        error: BaseException | None = None
        try:
            for fname, entries in self.plan.files:
                own = self.owners[fname] == self.group.rank
                for entry in entries:
                    with gathered(entry.gather):
                        if own and error is None:
                            try:
                                queue.put(self._stage_copy(entry), entry.nbytes)
                            except Exception as e:  # noqa: BLE001 - reported by the writer, collectively
                                error = e
        finally:
            self.stager.close()
            before_close()
            queue.close(error)

    def _stage_copy(self, entry: TensorEntry) -> ProducedTensor:
        """A private host copy of one merged tensor (the staging buffer is reused by the next
        tensor; a CPU result of the merge is already private), and its fp64 statistics, computed
        where it was made. The GPU tensor is dropped here, so the queue holds host memory only."""
        merged, host, stats = self._stage(entry, True)
        if merged.tensor.device.type != "cpu":
            host = host.clone()
        return ProducedTensor.of(entry, merged, host, *stats)

    def consume(self, staging: Path, queue: "_ByteQueue", readback: bool) -> BaseException | None:
        """Background thread: write the queued tensors into this rank's shards, in plan order,
        hashing each while it is written; then read the files back."""
        error: BaseException | None = None
        writer, mine = None, []
        last = {fname: entries[-1] for fname, entries in self.plan.files}
        files = dict(self.plan.files)
        for produced in queue:
            entry = produced.entry
            try:
                if error is None:
                    if writer is None:
                        writer = ShardWriter(staging / entry.file, files[entry.file])
                        mine.append(entry.file)
                    digest = self._hasher.submit(digest_tensor, entry.name, produced.host)
                    writer.append(entry, produced.host)
                    self._record(produced, digest.result())
                    if entry is last[entry.file]:
                        size = writer.close()
                        writer = None
                        self.written += size
                        self.observer.file_done(entry.file, size, linked=False)
            except Exception as e:  # noqa: BLE001
                error = e
                if writer is not None:
                    writer.abort()
                    writer = None
            finally:
                queue.release(entry.nbytes)
        self.close()
        return self._read_back(staging, mine, error or queue.error, readback)

    def _drain(self) -> None:
        """Wait for a digest still running (after a failure), before its staging buffer is reused."""
        if self._pending is not None:
            self._pending.digest.exception()
            self._pending = None


def _check_finite(entry: TensorEntry, out: torch.Tensor) -> None:
    """Every exported tensor is checked after the cast (merged, saved copies, trained, frozen): a
    NaN or Inf is refused, saying whether memory or the cast to the export dtype produced it."""
    name = entry.name
    if not non_finite_names([(name, out)]):
        return
    in_memory = non_finite_names([(name, entry.source.materialize(None).tensor)])
    cause = ("it is NaN/Inf in memory: training diverged, check the loss and the learning rate" if in_memory else
             f"it is finite in memory, but the cast to {str(out.dtype).removeprefix('torch.')} overflowed: export in "
             "a wider dtype (dtype='bf16' or 'fp32')")
    raise NonFiniteError(f"tensor '{name}' ({entry.role}) would be written with NaN or Inf values; {cause}. Nothing "
                         "was published.")


def _changed_error(capture: Capture) -> BaseException | None:
    try:
        capture.check_unchanged("the export")
    except ModelChangedError as e:
        return e
    return None


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not enabled)
