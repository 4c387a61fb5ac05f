"""One call for the export taken at a training checkpoint: :func:`start_checkpoint_export`
chooses how the snapshot is produced, so that a caller (``HFExportHook``) only says when.

Three modes, because what training may do meanwhile depends on where the weights are:

    sync      ``export_hf`` in the calling thread: training waits until the snapshot is
              published. For callers that asked for no background work.
    captured  whole parameters: what training changes next (the trainable tensors, the buffers)
              is copied into reused host buffers now; a thread reads, merges, writes, reads back
              and publishes the rest while training goes on.
    partitioned  partitioned parameters (DeepSpeed ZeRO-3, FSDP): each rank copies only its own
              pieces of the trainable parameters (no collective); a thread assembles each tensor
              on the rank that writes it over a gloo group of the exports' own (:mod:`.partitions`)
              and writes, reads back and publishes while training goes on.
    gathered  partitioned parameters whose pieces cannot be read as they are (NVMe offload, a
              quantized partition): only a collective gather, in the training thread, can read
              them. A writer thread starts first; the training thread then gathers and hands it
              host copies (:meth:`ExportHandle.run_front`).

``mode="auto"`` picks captured, partitioned or gathered from the model (:func:`checkpoint_export_mode`).

Collective-failure discipline: every rank calls :func:`start_checkpoint_export` at the same
point, with the same mode, and the training thread's collectives are fixed by the mode: sync,
those of ``export_hf``; captured, one agreement that every rank prepared its export; gathered,
that agreement, then the gathers of :meth:`ExportHandle.run_front`. A caller that agrees on
something first (HFExportHook's busy/skip ``all_gather``) does so before this call, on every
rank. No rank starts a thread before every rank has prepared its export: a failure on one rank
is one error on every rank, and nothing is published.

This module imports no mmengine (the core never does) and no converter: the converter is given
resolved (``sa2va_hooks.export.start_checkpoint_export`` resolves "auto", a name or a dict).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from torch import nn

# core internals the hooks reach through this module, in one block
from .dist import RankGroup, agree
from .errors import BadValueError, InternalError
from .background import ExportJob, Waitable
from .partitions import PieceExchange, partition_support
from .pipeline import prepare_background_export, prepare_gathered_export, prepare_partitioned_export, run_export
from .plan import ConverterProtocol
from .fingerprint import Fingerprint, FingerprintSet
from .host_process import HostProcess
from .manifest import ExportManifest
from .observer import ExportObserver
from .sharding import needs_gather
from .snapshot import Capture, SnapshotBuffers
from .shards import parse_size

MODES = ("auto", "sync", "captured", "partitioned", "gathered")
T = TypeVar("T")


def on_every_rank(fn: Callable[[], T], what: str, group: RankGroup | None = None) -> T:
    """``fn()`` on this rank, then one agreement (collective): if it raised on any rank, every rank
    raises (naming the rank and its cause; one process raises its own exception). A rank that alone
    meets a problem (a path missing on its node) would otherwise leave the others waiting in the
    next collective. ``what`` names the step in that error."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - every rank must learn of it, below
        error = e
    agree(group or RankGroup.current(), error, what)
    return result


def checkpoint_export_mode(model: nn.Module, mode: str = "auto") -> str:
    """The mode ``mode`` means for ``model``: "auto" is "captured" for whole parameters; for
    partitioned ones "partitioned" when every rank's pieces can be read as they are, else
    "gathered". The same answer on every rank (ZeRO-3 and FSDP partition every rank's model the
    same way), so every rank takes the same path."""
    if mode not in MODES:
        raise BadValueError(f"checkpoint export mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if not needs_gather(model):
        return "captured"
    return "partitioned" if partition_support(model) is None else "gathered"


class ExportHandle:
    """One checkpoint export, as its caller sees it in every mode: the snapshot's ``out_dir``,
    whether it is still ``running``, ``wait`` with a timeout, its ``result`` (manifest or error),
    and ``run_front``, the training thread's part. A sync export is finished when its handle is
    returned; a background one runs on an :class:`ExportJob` the handle hides, so callers need
    not reach into the job's task."""

    def __init__(self, mode: str, out_dir: Path, started: float, job: ExportJob | None = None,
                 manifest: ExportManifest | None = None, front: Callable[[], None] | None = None) -> None:
        self.mode, self.out_dir, self._job = mode, out_dir, job
        self._manifest, self._front = manifest, front
        self._started = started
        self._seconds = time.perf_counter() - started if job is None else None
        self.paused_s = time.perf_counter() - started  # how long the training thread was held so far

    @property
    def background(self) -> bool:
        return self._job is not None

    @property
    def running(self) -> bool:
        return self._job is not None and self._job.running

    def wait(self, timeout: float | None = None) -> bool:
        """Wait at most ``timeout`` seconds; True once the export has finished (well or not)."""
        return self._job is None or self._job.wait(timeout)

    def result(self) -> ExportManifest:
        """Wait, then return the manifest or raise the export's error."""
        if self._job is not None:
            return self._job.result()
        if self._manifest is None:
            raise InternalError(f"the export to {self.out_dir} has no manifest")
        return self._manifest

    @property
    def manifest(self) -> ExportManifest | None:
        return self._job.manifest if self._job is not None else self._manifest

    @property
    def error(self) -> BaseException | None:
        return self._job.error if self._job is not None else None

    @property
    def seconds(self) -> float | None:
        """The export's duration (a background one's thread), once finished."""
        return self._job.seconds if self._job is not None else self._seconds

    def run_front(self) -> float:
        """The training thread's part, called right after :func:`start_checkpoint_export` on every
        rank: under "gathered" the gathers (collective) and the copies to the host, at most the
        gather budget ahead of the writer thread; nothing otherwise. A separate step, so that the
        caller holds the handle of the running writer even when a gather fails. Returns the
        seconds the training thread was held by this export in all (the prepare included)."""
        front, self._front = self._front, None
        if front is not None:
            front()
        self.paused_s = time.perf_counter() - self._started
        return self.paused_s


def start_checkpoint_export(model: nn.Module, out_dir: str | Path, *, converter: ConverterProtocol, mode: str = "auto",
                            group: RankGroup | None = None, front: RankGroup | None = None,
                            buffers: SnapshotBuffers | None = None, capture: Capture | None = None,
                            on_done: Callable[[ExportHandle], None] | None = None,
                            gather_budget: int | None = None, label: str | None = None,
                            failed: BaseException | None = None, exchange: PieceExchange | None = None,
                            dtype: Any = None, max_shard_size: int | str = "5GB",
                            provenance: Mapping | None = None, baseline: Mapping[str, Fingerprint] | None = None,
                            overwrite: bool = False, readback: bool = True, progress: bool = False,
                            trained: FingerprintSet | None = None, link_from: str | Path | None = None,
                            observer: ExportObserver | None = None, after: Waitable | None = None,
                            host: HostProcess | None = None) -> ExportHandle:
    """Start the export of ``model`` as it is now to ``out_dir`` in ``mode`` (see the module
    docstring) and return its :class:`ExportHandle`. Collective: every rank calls it at the same
    point; then, for a background handle, ``run_front()`` at once.

    ``sync`` returns when the snapshot is published and raises the export's error. The
    background modes return once every rank prepared its export (a rank's failure there is
    raised on every rank, naming it, before any thread starts); later failures reach
    ``on_done(handle)``, called on the export's thread when it ends, and ``result()``.

    ``group`` is what the export's own exchanges go over: the training's group for sync
    (default every rank), and for the background modes one that only background exports use
    (default ``RankGroup.background()``; pass one kept from export to export). ``front`` is the
    training thread's group, for the agreement and the gathers (default every rank).
    ``exchange`` is the gloo group a partitioned export assembles its tensors over (the hook makes
    one before training and keeps it; without one, one is made here, collectively, on every rank).
    ``buffers`` are reused capture buffers; ``capture`` one already taken of this exact state
    (FingerprintHook's), used instead of a new one. ``gather_budget`` bounds the bytes gathered
    ahead of the writer (default 1.5 x ``max_shard_size``). ``label`` names the preparation in a
    rank failure (default: the export to ``out_dir``). ``failed`` is an error the caller met on
    this rank while working out the options: sync raises it at once (as the options' own code
    would have); the background modes take it to the agreement, so every rank fails together
    instead of the others waiting in a collective this rank never enters. ``after`` (captured
    mode) queues this export behind another: prepared now, its thread runs once that one has
    ended (``ExportJob.start``). ``host`` (background modes): the process that hashes, writes and
    reads back this rank's shards (:mod:`.host_process`); without one, threads of this process do.
    The rest are ``export_hf``'s options.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    mode = checkpoint_export_mode(model, mode)
    options = dict(converter=converter, dtype=dtype, max_shard_size=max_shard_size, provenance=provenance,
                   baseline=baseline, overwrite=overwrite, readback=readback, progress=progress, trained=trained,
                   link_from=link_from, observer=observer)
    if mode == "sync":
        if failed is not None:
            raise failed
        manifest = run_export(model, out_dir, group=group, **options)
        return ExportHandle(mode, out_dir, t0, manifest=manifest)
    front = front or RankGroup.current()
    group = group or RankGroup.background()
    options["host"] = host
    if mode == "partitioned" and exchange is None:  # first: every rank gets here, whatever fails next
        exchange = PieceExchange.create(group.timeout_s or 600.0)
    handle: ExportHandle | None = None

    def done(_job: ExportJob) -> None:
        if on_done is not None and handle is not None:
            on_done(handle)

    job, error = None, failed
    try:
        if failed is not None:
            pass  # the agreement below raises it on every rank
        elif mode == "gathered":
            job = prepare_gathered_export(model, out_dir, group=group, on_done=done, **options)
        elif mode == "partitioned":
            job = prepare_partitioned_export(model, out_dir, exchange=exchange, capture=capture, buffers=buffers,
                                             group=group, on_done=done, **options)
        else:
            job = prepare_background_export(model, out_dir, capture=capture, buffers=buffers, group=group,
                                            on_done=done, **options)
    except Exception as e:  # noqa: BLE001 - every rank must learn of it before any thread starts
        error = e
    agree(front, error, label or f"preparing the export to {out_dir}")
    if mode in ("captured", "partitioned"):  # recorded before the thread can write the manifest
        job.task.provenance["training_paused_s"] = round(time.perf_counter() - t0, 4)
        handle = ExportHandle(mode, out_dir, t0, job)
    else:
        budget = gather_budget if gather_budget is not None else int(1.5 * parse_size(max_shard_size))
        handle = ExportHandle(mode, out_dir, t0, job, front=lambda: job.task.gather_in_front(front, budget))
    job.start(after=after)
    return handle
