"""The export pipeline: from an in-memory model and a converter to a verified, load-checked,
published HF snapshot, in steps, each a module of its own:

    plan       walk the model, name every tensor (converter), shard           :mod:`.plan`
    stage      rank 0 opens the staging directory every rank writes into      :mod:`.publish`
    produce    merge, check (whole, finite), stage to the host                :mod:`.produce`
    write      each rank its shards, hashing as it writes, then reads back    :mod:`.rank_writer`
    agree      every rank succeeded, or every rank raises                     :mod:`.dist`
    describe   rank 0: index, config and extras, load check, manifest, verify :mod:`.finish`
    publish    rank 0: one atomic rename, then tells the other ranks          :mod:`.publish`

``sa2va_hooks.export`` resolves the converter ("auto", a name, a dict) and calls
:func:`run_export`; the hooks and ``tools/export.py`` go through it, so an in-loop export and an
offline re-export of the same weights give the same root digest. The converter is any object with
the :class:`~.plan.ConverterProtocol`; this module imports no converter and no mmengine.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from .background import ExportJob, FrontFailedError, _ByteQueue
from .dist import RankFailedError, RankFailure, RankGroup, agree, describe
from .fingerprint import Fingerprint, FingerprintSet
from .host_process import HostProcess
from .finish import describe_snapshot
from .manifest import ExportManifest
from .observer import NO_OBSERVER, ExportObserver
from .plan import ConverterProtocol, parse_dtype, plan_export
from .partitions import PieceExchange
from .produce import AssembleProducer, QueueProducer, SyncProducer, feed_gathered, fingerprint_pieces, \
    trained_fingerprints
from .publish import _Previous, discard_staging, open_staging, publish, removed_on_failure
from .rank_writer import RankWriter
from .sharding import UnsupportedShardingError, needs_gather, refuse_unsupported_sharding
from .snapshot import Capture, ModelChangedError, SnapshotBuffers, substituted


def run_export(model: nn.Module, out_dir: str | Path, *, converter: ConverterProtocol, dtype: Any = None,
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
                 buffers: SnapshotBuffers | None = None, on_done: Callable[[ExportJob], None] | None = None,
                 **options: Any) -> ExportJob:
    """Export in the background: what training changes next (the trainable tensors, the buffers)
    is copied now, into ``buffers`` (reused from one export to the next); the frozen rest is read
    by a thread while the caller goes on, and its version counters must be unchanged at the end
    or nothing is published. Returns the running :class:`ExportJob`; its snapshot holds exactly
    the weights of this moment. Takes :func:`run_export`'s keyword options; ``group`` must then
    be a group only background exports use (``RankGroup.background()``)."""
    job = prepare_background_export(model, out_dir, capture=capture, buffers=buffers, on_done=on_done, **options)
    return job.start()


def prepare_gathered_export(model: nn.Module, out_dir: str | Path, *,
                            on_done: Callable[[ExportJob], None] | None = None, **options: Any) -> ExportJob:
    """For partitioned parameters (ZeRO-3, FSDP): a job whose thread writes what the training
    thread then gathers and stages with ``job.task.gather_in_front(group, budget)`` (start the
    job first). The stall is the gathers and the copies to the host; the writes, read-back and
    publishing are in the background."""
    task = ExportTask(model, out_dir, **options)
    task.expects_front()
    return ExportJob(task, on_done)


def prepare_partitioned_export(model: nn.Module, out_dir: str | Path, *, exchange: PieceExchange,
                               capture: Capture | None = None, buffers: SnapshotBuffers | None = None,
                               on_done: Callable[[ExportJob], None] | None = None, **options: Any) -> ExportJob:
    """For partitioned parameters (ZeRO-3, FSDP) whose pieces can be read (:mod:`.partitions`):
    the capture copies this rank's pieces of the trainable parameters (no collective); the job's
    thread assembles every tensor on the rank that writes it over ``exchange`` (a gloo group of
    the exports' own), writes, reads back and publishes. Not started yet (see
    :func:`prepare_background_export`)."""
    if capture is None:
        capture = (buffers or SnapshotBuffers()).capture(model)
    if not capture.partitioned:
        raise UnsupportedShardingError("a partitioned export needs a capture of the model's partitions; this capture "
                                       "holds whole parameters (the model is not partitioned)")
    return ExportJob(ExportTask(model, out_dir, capture=capture, exchange=exchange, **options), on_done)


def prepare_background_export(model: nn.Module, out_dir: str | Path, *, capture: Capture | None = None,
                              buffers: SnapshotBuffers | None = None,
                              on_done: Callable[[ExportJob], None] | None = None, **options: Any) -> ExportJob:
    """The synchronous half of :func:`start_export` (plan and capture), not started yet: a
    multi-rank caller agrees that every rank got this far before any rank starts its thread."""
    if needs_gather(model):
        raise UnsupportedShardingError(
            "a background export reads the frozen tensors while training goes on, but this model's parameters are "
            "partitioned (DeepSpeed ZeRO-3 or FSDP), so only a collective gather can read them; use the synchronous "
            "export_hf (HFExportHook does so automatically under ZeRO-3 and FSDP).")
    if capture is None:
        capture = (buffers or SnapshotBuffers()).capture(model)
    return ExportJob(ExportTask(model, out_dir, capture=capture, **options), on_done)


class ExportTask:
    """One export: planned at construction (names, shapes, shards: no tensor data is produced),
    carried out by :meth:`run`, in this thread or another."""

    def __init__(self, model: nn.Module, out_dir: str | Path, *, converter: ConverterProtocol, dtype: Any = None,
                 max_shard_size: int | str = "5GB", provenance: Mapping | None = None,
                 baseline: Mapping[str, Fingerprint] | None = None, overwrite: bool = False,
                 readback: bool = True, progress: bool = False, trained: FingerprintSet | None = None,
                 group: RankGroup | None = None, link_from: str | Path | None = None,
                 capture: Capture | None = None, observer: ExportObserver | None = None,
                 exchange: PieceExchange | None = None, host: HostProcess | None = None) -> None:
        self.model, self.out_dir = model, Path(out_dir)
        self.host = host  # hashes, writes, reads back (and on rank 0 load-checks) in a process of its own
        self.exchange = exchange  # a partitioned capture's tensors are assembled over it
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

    def run(self) -> ExportManifest:
        with substituted(self.capture if self.capture.background else None):
            return self._run()

    def _run(self) -> ExportManifest:
        """This rank's whole export: write its shards (from the front's queue, or producing them
        here), then :meth:`_conclude`. Every error up to the agreement is taken to it."""
        if self._front_ready is not None:
            trained, staging, rank_writer, queue = self._wait_for_front()
            producer = QueueProducer(queue)
        else:
            trained = self.trained if self.trained is not None else self._trained_now()
            previous = _Previous.load(self.link_from)
            staging = open_staging(self.out_dir, self.plan, self.group, overwrite=self.overwrite)
            rank_writer = producer = None
        try:
            if rank_writer is None:
                rank_writer = self._rank_writer(trained, previous)
                producer = (AssembleProducer(self.capture, self.exchange, rank_writer.owners, self.observer)
                            if self.exchange is not None else SyncProducer(self.observer, needs_gather(self.model)))
            error = rank_writer.write(staging, producer, self.readback)
        except Exception as e:  # noqa: BLE001 - taken to the agreement: no rank may skip it
            error = e
        return self._conclude(trained, staging, rank_writer, error)

    def _trained_now(self) -> FingerprintSet:
        """The trainable parameters' fingerprints, unless the caller passed them: from the capture's
        pieces over the exchange (partitioned), else from the (captured or live) model."""
        if self.exchange is not None:
            return FingerprintSet.of(fingerprint_pieces(self.capture, self.exchange))
        return trained_fingerprints(self.model, self.group)

    def _rank_writer(self, trained: FingerprintSet, previous: _Previous | None = None) -> RankWriter:
        return RankWriter(self.plan, self.group.rank, self.group.world, trained=trained, baseline=self.baseline,
                          progress=self.progress, collective=needs_gather(self.model), previous=previous,
                          group=self.group, observer=self.observer, host=self.host)

    def _conclude(self, trained: FingerprintSet, staging: Path, rank_writer: RankWriter | None,
                  error: BaseException | None) -> ExportManifest:
        """Every rank: agree on success, then rank 0 finishes, publishes and tells the others. That
        last step is one-way: once rank 0 has published it reports success whatever became of the
        other ranks since they sent their records (it never waits for them again)."""
        group, out_dir = self.group, self.out_dir
        with removed_on_failure(staging, group):
            agree(group, error or _changed_error(self.capture), f"export of {out_dir}")
            parts = group.all_gather((rank_writer.tensors, rank_writer.effect, rank_writer.storage()))
            provenance = {"background": self.capture.background, **self.provenance, "ranks": group.world,
                          "shard_writers": {f: rank_writer.owners[f] for f, _ in self.plan.files}}
            result = self._finish_on_main(parts, staging, trained, provenance) if group.is_main else None
            status, payload = group.broadcast(result)
            if status != "published":
                raise RankFailedError([RankFailure(0, payload)], f"publishing {out_dir}")
            return ExportManifest.from_json(payload)

    def _finish_on_main(self, parts: list, staging: Path, trained: FingerprintSet, provenance: dict) -> tuple:
        """Rank 0: finish and publish; with other ranks waiting, a failure becomes the result they
        are sent (each then raises it), and rank 0 raises it with them."""
        try:
            return "published", self._finish(parts, staging, trained, provenance).to_json()
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, through the broadcast
            if self.group.world == 1:
                raise
            return "failed", describe(e)

    def _finish(self, parts: list, staging: Path, trained: FingerprintSet, provenance: dict) -> ExportManifest:
        """Rank 0, after every rank wrote and read back its shards: describe and verify the staged
        snapshot, then publish it, unless the model changed meanwhile or a rank gave up."""
        manifest = describe_snapshot(staging, parts, self.export_plan, model=self.model, conv=self.conv, dt=self.dt,
                                     trained=trained, provenance=provenance, readback=self.readback,
                                     out_dir=self.out_dir, host=self.host)
        self.capture.check_unchanged("the export")
        self.group.raise_if_abandoned()  # a rank that gave up has logged a failure: do not contradict it
        publish(staging, self.out_dir, overwrite=self.overwrite)
        return manifest

    # -- partitioned parameters: gathered in the training thread, written by this task's thread --
    def expects_front(self) -> None:
        """This task's tensors will come from :meth:`gather_in_front`; :meth:`run` waits for them."""
        self._front_ready = threading.Event()
        self.capture = Capture({}, {}, {}, 0)  # everything is read in the front, while no step runs
        self.provenance["background"] = True

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
            staging = open_staging(self.out_dir, self.plan, front, overwrite=self.overwrite)
        except BaseException as e:
            self._front = e
            self._front_ready.set()
            raise
        rank_writer = self._rank_writer(trained)
        queue = _ByteQueue(budget, self.group.timeout_s)
        if self._abandoned:
            queue.abandon()
        self._front = (trained, staging, rank_writer, queue)
        self._front_ready.set()

        def paused() -> None:  # recorded before the writer can finish (it waits for the close)
            self.provenance["training_paused_s"] = round(time.perf_counter() - t0, 4)

        feed_gathered(self.plan, rank_writer.owners, self.group.rank, queue, self.observer, before_close=paused)
        if queue.before_close:  # the writer died first: nobody else will remove it
            discard_staging(staging, self.group)

    def abandon_front(self) -> None:
        """This task's thread has ended: the training thread must not wait for it to take more."""
        self._abandoned = True
        if isinstance(self._front, tuple):
            self._front[3].abandon()

    def _wait_for_front(self) -> tuple:
        self._front_ready.wait()
        if isinstance(self._front, BaseException):
            raise FrontFailedError(f"the gathers of {self.out_dir} failed in the training thread: "
                                   f"{describe(self._front)}") from self._front
        return self._front


def _changed_error(capture: Capture) -> BaseException | None:
    try:
        capture.check_unchanged("the export")
    except ModelChangedError as e:
        return e
    return None
