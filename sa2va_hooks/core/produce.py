"""Step 2 of an export, produce: each planned tensor merged, checked (whole, finite), staged to the
host with its statistics, and handed to this rank's writer (:mod:`.rank_writer`).

Producers, one interface (:class:`Producer`), so that one writer serves every mode:

    SyncProducer     the writer's own thread produces each tensor as it writes it: a plain
                     export, and a background export of a captured model (the capture is
                     substituted for the whole task, fingerprints and config included, so its
                     producer is this one)
    QueueProducer    the writer's side of a ZeRO-3 / FSDP export: the tensors were gathered and
                     copied by the training thread (:func:`feed_gathered`) and wait in a queue

A producer yields nothing more once the rank's latch is set, but goes on entering every gather
(the collective-failure discipline, see :mod:`.latch`). The same produce-and-check code also reads
whole parameters for the fingerprints (:func:`fingerprint_whole`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from .dist import RankGroup, agree, describe
from .entry import ProducedTensor, TensorEntry
from .fingerprint import (DIGEST_ALGORITHM, Fingerprint, FingerprintSet, fingerprint_tensor, stats_values,
                          tensor_stats_pending)
from .host import HostStager
from .latch import _Latch
from .merge import NonFiniteError, non_finite_names
from .observer import ExportObserver
from .sharding import check_full, gathered, is_partitioned, iter_whole_parameters
from .shards import ShardPlan
from .partitions import PieceExchange, PieceExchangeError, check_cover
from .snapshot import Capture, live

if TYPE_CHECKING:
    from .background import _ByteQueue


def produce_one(entry: TensorEntry, stager: HostStager, observer: ExportObserver, *,
                private: bool = False) -> ProducedTensor:
    """Merge, check and stage one tensor to the host, with its fp64 norm and sum (computed on its
    device). ``private``: a copy of its own (the staging buffer is reused by the next tensor; a CPU
    result of the merge is already private), for a tensor that waits in a queue; the GPU tensor
    is dropped here, so the queue holds host memory only. The observer sees the start and the
    end, failed or not."""
    observer.tensor_producing(entry)
    try:
        merged = entry.materialize()
        check_full(entry.name, merged.tensor, entry.shape)
        pending = tensor_stats_pending(merged.tensor)  # queued before the copy, read after its wait
        host = stager.to_host(merged.tensor)
        stats = stats_values(pending)
        if not (math.isfinite(stats[0]) and math.isfinite(stats[1])):
            _check_finite(entry, merged.tensor)  # says why, and raises when a value is NaN/Inf
    finally:
        observer.tensor_produced(entry)
    if private and merged.tensor.device.type != "cpu":
        host = host.clone()
    return ProducedTensor.of(entry, merged, host, *stats)


def _check_finite(entry: TensorEntry, out: torch.Tensor) -> None:
    """Every exported tensor is checked after the cast (merged, saved copies, trained, frozen): a
    NaN or Inf is refused, saying whether memory or the cast to the export dtype produced it.

    :func:`produce_one` calls this only when the tensor's fp64 statistics are not finite: a NaN or
    Inf element makes its sum of squares NaN or Inf (every term is >= 0, nothing cancels), so finite
    statistics prove every element finite, with no check of its own (fewer torch calls in the
    export's thread, issue 18). The converse does not hold (fp64 squares of huge fp64 values
    overflow), hence this exact check then."""
    name = entry.name
    if not non_finite_names([(name, out)]):
        return
    in_memory = non_finite_names([(name, entry.source.materialize(None).tensor)])
    cause = ("it is NaN/Inf in memory: training diverged, check the loss and the learning rate" if in_memory else
             f"it is finite in memory, but the cast to {str(out.dtype).removeprefix('torch.')} overflowed: export in "
             "a wider dtype (dtype='bf16' or 'fp32')")
    raise NonFiniteError(f"tensor '{name}' ({entry.role}) would be written with NaN or Inf values; {cause}. Nothing "
                         "was published.")


class Producer(Protocol):
    # Whether a file's tensors can be produced a second time (a failed hard link falls back to
    # writing the file, and under ZeRO-3 / FSDP every rank then enters its gathers again).
    repeatable: bool

    def produce(self, entries: Sequence[TensorEntry], own: bool, latch: _Latch) -> Iterator[ProducedTensor]:
        """One file's part: its tensors in plan order when this rank writes the file (``own``),
        none once ``latch`` is set. A produced tensor's host bytes are valid until the next one
        is asked for. Its own errors go into ``latch``; it never raises."""

    def finish(self, latch: _Latch) -> None:
        """After the last file: wait for what is still in flight; its error goes into ``latch``."""

    def close(self) -> None:
        """Release the staging buffer; never raises."""


class SyncProducer:
    """Produces in the writer's thread. ``collective`` (ZeRO-3, FSDP): the gathers of every file
    are entered, the files other ranks write included, so all ranks enter them in one order."""

    repeatable = True

    def __init__(self, observer: ExportObserver, collective: bool) -> None:
        self.observer, self.collective = observer, collective
        self.stager = HostStager()

    def produce(self, entries: Sequence[TensorEntry], own: bool, latch: _Latch) -> Iterator[ProducedTensor]:
        if not (own or self.collective):
            return
        for entry in entries:
            with gathered(entry.gather):
                if own and not latch.failed:
                    produced = latch.call(produce_one, entry, self.stager, self.observer)
                    if produced is not None:
                        yield produced  # written while still gathered: the bytes may be a view of it

    def finish(self, latch: _Latch) -> None:
        pass

    def close(self) -> None:
        self.stager.close()


class QueueProducer:
    """The writer thread's side of a gathered export: takes this rank's tensors from the queue
    the training thread fills (:func:`feed_gathered`), in plan order. Each item's bytes are
    released to the queue's budget once the writer asks for the next one. Not repeatable: the
    training thread gathers and queues each tensor once."""

    repeatable = False

    def __init__(self, queue: _ByteQueue) -> None:
        self.queue = queue

    def produce(self, entries: Sequence[TensorEntry], own: bool, latch: _Latch) -> Iterator[ProducedTensor]:
        if not own:
            return  # the training thread entered its gathers
        items = iter(self.queue)
        for _ in entries:
            produced = next(items, None)
            if produced is None:  # the training thread stopped early: its error says why
                latch.set(self.queue.error)
                return
            try:
                yield produced  # after a failure the writer skips it, but it is still taken and released
            finally:
                self.queue.release(produced.entry.nbytes)

    def finish(self, latch: _Latch) -> None:
        """Wait until the training thread closes the queue (it records the training pause first,
        which the manifest reports)."""
        for produced in self.queue:
            self.queue.release(produced.entry.nbytes)
        latch.set(self.queue.error)

    def close(self) -> None:
        pass


def feed_gathered(plan: ShardPlan, owners: Mapping[str, int], rank: int, queue: _ByteQueue,
                  observer: ExportObserver, before_close: Callable[[], None] = lambda: None) -> None:
    """Training thread: enter every gather in plan order (collective) and queue a private host
    copy of each tensor this rank writes. Blocks while the queue holds its byte budget (the
    writer is behind). After a failure it keeps entering the gathers, queueing nothing; the
    failure is handed to the writer with the queue's close."""
    latch, stager = _Latch(), HostStager()
    try:
        for fname, entries in plan.files:
            own = owners[fname] == rank
            for entry in entries:
                with gathered(entry.gather):
                    if own and not latch.failed:
                        latch.call(_put, queue, entry, stager, observer)
    finally:
        stager.close()
        before_close()
        queue.close(latch.error)


def _put(queue: _ByteQueue, entry: TensorEntry, stager: HostStager, observer: ExportObserver) -> None:
    queue.put(produce_one(entry, stager, observer, private=True), entry.nbytes)


# -- whole parameters, for the fingerprints ------------------------------------------------------
def fingerprint_whole(model: nn.Module, keep, group: RankGroup | None = None, *,
                      algorithms: Mapping[str, str] | None = None,
                      algorithm: str = DIGEST_ALGORITHM) -> dict[str, Fingerprint]:
    """Fingerprints of the parameters ``keep`` accepts, each read whole (gathered one module at a
    time under ZeRO-3). Collective: every rank walks the same modules; rank r hashes every
    ``world``-th tensor and the results are exchanged, so the work is split and the answer is the
    same on every rank and for every world size. An empty or partial tensor is an error.
    ``algorithm`` (or ``algorithms``, per name) is another digest version only to compare with a
    record made in it."""
    algorithms = algorithms or {}
    group = group or RankGroup.current()
    stager = HostStager()
    mine: dict[str, dict] = {}
    latch = _Latch()
    for i, (name, p) in enumerate(iter_whole_parameters(model, keep)):
        if not latch.failed and i % group.world == group.rank:
            fp = latch.call(_fingerprint_one, name, p, stager, algorithms.get(name, algorithm))
            if fp is not None:
                mine[name] = fp
    stager.close()
    agree(group, latch.error, "fingerprinting the model")
    return {n: Fingerprint.from_json(fp) for part in group.all_gather(mine) for n, fp in part.items()}


def _fingerprint_one(name: str, p: torch.Tensor, stager: HostStager, algorithm: str) -> dict:
    check_full(name, p)
    t = live(p).detach()
    host = stager.to_host(t)
    if is_partitioned(p) and host.data_ptr() == p.data_ptr():
        # hashing goes through numpy, which pins the storage (not resizable); the engine must
        # free a gathered CPU parameter's storage when the gather ends, so hash a copy
        host = host.clone()
    return fingerprint_tensor(name, t, host=host, algorithm=algorithm).to_json()


def trained_fingerprints(model: nn.Module, group: RankGroup | None = None, *,
                         algorithms: Mapping[str, str] | None = None) -> FingerprintSet:
    """Fingerprints of every trainable parameter under its training-time (checkpoint) name;
    ``algorithms`` (name -> digest algorithm) recomputes them as a stored record made them."""
    return FingerprintSet.of(fingerprint_whole(model, lambda p: p.requires_grad, group, algorithms=algorithms))


def frozen_root(model: nn.Module, group: RankGroup | None = None, *, algorithm: str = DIGEST_ALGORITHM) -> str:
    """One digest over every frozen parameter: catches a changed base model or pretrained_pth.
    ``algorithm``: the tensor digests' version, to compare with a root recorded in an older one."""
    return FingerprintSet.of(fingerprint_whole(model, lambda p: not p.requires_grad, group,
                                               algorithm=algorithm)).root


# -- partitioned parameters, assembled in the export's thread -------------------------------------
class AssembleProducer:
    """The writer thread's producer for a captured partitioned model (ZeRO-3, FSDP): for every
    tensor of every file, in plan order on every rank, each partitioned parameter it reads is
    assembled on the file's writer from every rank's piece (:class:`~.partitions.PieceExchange`,
    a gloo group of the export's own: never the training group). The writer then produces the
    tensor from the assembled copies (substituted, as a capture is, for the live parameters).
    A rank that failed keeps entering the exchanges (sending zeros) until the walk ends."""

    repeatable = True  # a file's tensors can be produced again (its exchanges entered again)

    def __init__(self, capture: Capture, exchange: PieceExchange, owners: Mapping[str, int],
                 observer: ExportObserver) -> None:
        self.capture, self.exchange, self.owners, self.observer = capture, exchange, owners, observer
        self.stager = HostStager()
        self.spans = piece_spans(capture, exchange)

    def produce(self, entries: Sequence[TensorEntry], own: bool, latch: _Latch) -> Iterator[ProducedTensor]:
        owner = self.owners[entries[0].file] if entries else 0
        for entry in entries:
            ids = self._assemble(entry, owner, latch)
            try:
                if own and not latch.failed:
                    produced = latch.call(produce_one, entry, self.stager, self.observer)
                    if produced is not None:
                        yield produced
            finally:
                for i in ids:
                    self.capture.by_id.pop(i, None)

    def _assemble(self, entry: TensorEntry, owner: int, latch: _Latch) -> list[int]:
        """Every partitioned parameter ``entry`` reads, whole on ``owner`` (collective)."""
        done = []
        for p in entry.gather:
            piece = self._piece(p)
            if piece is None:
                continue
            mine = None if latch.failed else latch.call(self._mine, p, piece)
            try:
                full = self.exchange.assemble(mine, self.spans[piece.name], piece, owner)
            except Exception as e:  # noqa: BLE001 - a broken exchange: every later one fails too
                latch.set(PieceExchangeError(f"assembling '{piece.name}' from every rank's partition failed: "
                                             f"{type(e).__name__}: {e}"))
                raise latch.error from e
            if full is not None and not latch.failed:
                self.capture.by_id[id(p)] = full
                done.append(id(p))
        return done

    def _piece(self, p: torch.Tensor):
        held = self.capture.pieces.get(id(p))
        return held[0] if held is not None else self.capture.live_pieces.get(id(p))

    def _mine(self, p: torch.Tensor, piece) -> torch.Tensor:
        held = self.capture.pieces.get(id(p))
        if held is not None:
            self.capture.wait(piece.name)
            return held[1]
        return self.stager.to_host(piece.read())  # frozen: read live, version-checked at the end

    def finish(self, latch: _Latch) -> None:
        pass

    def close(self) -> None:
        self.stager.close()


def piece_spans(capture: Capture, exchange: PieceExchange) -> dict[str, list[tuple[int, int]]]:
    """Every rank's ``(start, length)`` of every partitioned parameter, by name (one small
    collective over the exchange's group); each parameter's pieces must cover it exactly."""
    mine = {piece.name: (piece.start, piece.length) for piece, _ in capture.pieces.values()}
    mine.update({piece.name: (piece.start, piece.length) for piece in capture.live_pieces.values()})
    numel = {piece.name: piece.numel for piece, _ in capture.pieces.values()}
    numel.update({piece.name: piece.numel for piece in capture.live_pieces.values()})
    every = exchange.all_gather(mine)
    spans = {}
    for name in mine:
        spans[name] = [rank.get(name, (0, 0)) for rank in every]
        check_cover(name, spans[name], numel[name])
    return spans


def fingerprint_pieces(capture: Capture, exchange: PieceExchange) -> dict[str, Fingerprint]:
    """Fingerprints of the captured trainable parameters of a partitioned model, each assembled
    whole on one rank from the pieces (rank ``i % world`` hashes the ``i``-th) over the exchange's
    group, then shared: the same digests as fingerprinting the whole parameters, on any topology.
    Collective over the exchange's group."""
    spans = piece_spans(capture, exchange)
    by_name = {piece.name: (p_id, piece) for p_id, (piece, _) in capture.pieces.items()}
    latch, mine = _Latch(), {}
    for i, name in enumerate(capture.trainable):
        owner = i % exchange.world
        if name in by_name:
            p_id, piece = by_name[name]
            capture.wait(name)
            full = exchange.assemble(capture.pieces[p_id][1], spans[name], piece, owner)
        else:
            full = capture.by_name[name] if owner == exchange.rank else None  # whole: not partitioned
        if full is not None and not latch.failed:
            fp = latch.call(fingerprint_tensor, name, full)
            if fp is not None:
                mine[name] = fp.to_json()
    parts = exchange.all_gather((mine, describe(latch.error) if latch.error else None))
    failed = [f"rank {r}: {err}" for r, (_, err) in enumerate(parts) if err]
    if failed:
        raise PieceExchangeError(f"fingerprinting the partitioned parameters failed on {'; '.join(failed)}")
    return {n: Fingerprint.from_json(fp) for part, _ in parts for n, fp in part.items()}
