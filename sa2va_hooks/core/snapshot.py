"""A frozen moment of a training model, taken in milliseconds, read at leisure.

A background export must write the weights of its checkpoint iteration, although training goes
on. What training changes next is small for LoRA (the trainable tensors and the buffers), so only
that is copied synchronously, into host buffers that are allocated once and reused (pinned when
the model is on a GPU: a pinned device-to-host copy runs at tens of GiB/s, a fresh pageable one at
about 1.3 GiB/s). Everything else, the frozen base, is read later from the live model; its version
counters, recorded at the capture, prove afterwards that nothing wrote to it meanwhile.

While a :class:`Capture` is :func:`substituted`, :func:`live` hands out the captured copy of a
tensor instead of the tensor itself. The merge code reads every tensor through :func:`live`, so
the same code path exports the live model (synchronously) or a captured moment (in the
background).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .fingerprint import Fingerprint, digest_tensor, dtype_name, tensor_stats, tensor_stats_pending
from .partitions import PartitionBuffers, Piece, is_captured, partitioned_parameters, pieces
from .sharding import UnsupportedShardingError, clean_name, is_partitioned, iter_whole_parameters, needs_gather
from .workers import Workers
from .errors import ExportFailedError

_SUBSTITUTE: contextvars.ContextVar[Mapping[int, torch.Tensor] | None] = contextvars.ContextVar(
    "sa2va_hooks_substitute", default=None)


# the modules' own parameters as they were at the capture, by the module's id: FSDP (use_orig_params)
# swaps a module's parameters for plain tensors while its forward runs, so a background reader must
# not look them up in the live module then
_MODULE_PARAMS: contextvars.ContextVar[Mapping[int, dict] | None] = contextvars.ContextVar(
    "sa2va_hooks_module_params", default=None)


def own_parameters(module: nn.Module) -> Mapping[str, torch.Tensor | None]:
    """``module._parameters``, or what it held at the capture while one is substituted. Raw
    entries either way: DeepSpeed ZeRO-3's parameter dict gathers a parameter read by key while
    a forward runs, a collective that a background reader must never start."""
    recorded = _MODULE_PARAMS.get()
    held = None if recorded is None else recorded.get(id(module))
    return dict(dict.items(module._parameters)) if held is None else held


class ModelChangedError(ExportFailedError, RuntimeError):
    """A tensor that a background export reads from the live model was written meanwhile."""


def live(t: torch.Tensor) -> torch.Tensor:
    """``t``, or its captured copy (on ``t``'s device) while a capture is substituted."""
    sub = _SUBSTITUTE.get()
    if sub is None:
        return t
    copy = sub.get(id(t))
    if copy is None:
        return t
    return copy if copy.device == t.device else copy.to(t.device)


def read(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``live(t)``, and whether the result is a private copy that nothing else holds (a captured
    tensor just moved to ``t``'s device), which a caller may then use without cloning it."""
    sub = _SUBSTITUTE.get()
    copy = None if sub is None else sub.get(id(t))
    if copy is None:
        return t, False
    if copy.device == t.device:
        return copy, False  # the capture buffer itself: reused by the next capture
    return copy.to(t.device), True


@contextlib.contextmanager
def substituted(capture: "Capture | None") -> Iterator[None]:
    if capture is not None:
        capture.wait()  # every copy into the buffers is complete before anything reads them
    token = _SUBSTITUTE.set(None if capture is None else capture.by_id)
    params = _MODULE_PARAMS.set(None if capture is None else capture.module_params)
    try:
        yield
    finally:
        _MODULE_PARAMS.reset(params)
        _SUBSTITUTE.reset(token)


@dataclasses.dataclass
class Capture:
    """The captured tensors (by the live tensor's id and by name) and the version counters of
    every tensor that was not captured, at the moment of the capture."""

    by_id: dict[int, torch.Tensor]
    by_name: dict[str, torch.Tensor]
    versions: dict[str, tuple[torch.Tensor, int]]
    nbytes: int
    trainable: list[str] = dataclasses.field(default_factory=list)  # captured parameters (not buffers)
    stats: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # name -> (norm, sum)
    ready: dict[str, "torch.cuda.Event"] = dataclasses.field(default_factory=dict)  # GPU copy done
    # partitioned parameters (ZeRO-3, FSDP): this rank's copied pieces, by the parameter's id, with
    # their host copy; and the pieces read live (frozen), by id. See :mod:`.partitions`.
    pieces: dict[int, tuple[Piece, torch.Tensor]] = dataclasses.field(default_factory=dict)
    live_pieces: dict[int, Piece] = dataclasses.field(default_factory=dict)
    partitioned: bool = False
    module_params: dict[int, dict] = dataclasses.field(default_factory=dict)  # see own_parameters
    # frozen pieces read live whose storage also holds trainable ones (FSDP): checked by content,
    # their (norm, sum) at the capture (queued there, read when checked), see :mod:`.partitions`
    checked: list[Piece] = dataclasses.field(default_factory=list)
    checked_stats: Callable[[], list[tuple[float, float]]] = lambda: []

    def wait(self, name: str | None = None) -> None:
        """Wait until the copy of ``name`` (or of everything) into its host buffer is complete."""
        for n in ([name] if name is not None else list(self.ready)):
            event = self.ready.get(n)
            if event is not None:
                event.synchronize()

    @classmethod
    def nothing(cls, model: nn.Module) -> "Capture":
        """No copy at all: every parameter is read live, and all their versions are checked (the
        synchronous export, which runs while no optimizer step can)."""
        return cls({}, {}, {clean_name(n): (p, p._version) for n, p in model.named_parameters()}, 0)

    @property
    def background(self) -> bool:
        return bool(self.by_id) or self.partitioned

    def check_unchanged(self, what: str) -> None:
        """Raise :class:`ModelChangedError` if any uncaptured tensor was written since the capture."""
        changed = [n for n, (t, v) in self.versions.items() if t._version != v]
        changed += [piece.name for piece, before in zip(self.checked, self.checked_stats(), strict=True)
                    if not _same_stats(tensor_stats(piece.read()), before)]
        if not changed:
            return
        if self.background:
            hint = ("something wrote in place to parameters that are not trainable (requires_grad=False) while the "
                    "background export read them: make them trainable, or export synchronously "
                    "(HFExportHook(background=False)).")
        else:
            hint = ("export when no optimizer step can run (HFExportHook does), or export from a copy.")
        raise ModelChangedError(
            f"{len(changed)} parameter(s) were modified in place while {what} was reading the model, e.g. "
            f"{changed[:5]}; the snapshot would mix two training states and was not published. Fix: {hint}")


def checks_by_content(piece: Piece) -> bool:
    """A frozen piece whose storage also holds trainable ones (an FSDP unit with LoRA) is read live and
    checked by content when it is on a GPU: its statistics at the capture are a few queued kernels.
    On the CPU (FSDP's CPU offload) they would cost the training thread ~26x the copy they replace
    (1 GiB of fp32: 1.46 s against 0.055 s on a 2-core machine), so there it is copied (decision 63)."""
    return piece.shared and piece.storage.device.type == "cuda"


def copied_at_capture(p: torch.Tensor, piece: Piece) -> bool:
    """Whether a capture copies this piece: trainable, or shared with trainable ones and not checked
    by content; the rest is read live by the export."""
    return is_captured(p, piece) or (piece.shared and not checks_by_content(piece))


def _same_stats(now: tuple[float, float], before: tuple[float, float]) -> bool:
    """The same fp64 norm and sum, bit for bit (the same kernels over the same bytes); NaN equals NaN
    here, so a frozen NaN is reported as NaN by the export's own check, not as a change."""
    return all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(now, before, strict=True))


def _captured_tensors(model: nn.Module, parameters: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """What training may change before a background export has read it: every trainable
    parameter, gathered whole if partitioned (collective), and every persistent buffer (running
    statistics change in forward; DDP re-broadcasts buffers)."""
    if parameters:
        yield from iter_whole_parameters(model, lambda p: p.requires_grad)
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for bname, b in module._buffers.items():
            if b is None or bname in module._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            yield clean_name(f"{mod_name}.{bname}" if mod_name else bname), b


class SnapshotBuffers:
    """Host buffers for the captured tensors, allocated once (``prepare``) and reused by every
    capture, so that no capture pays for allocating or faulting in fresh memory."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._pieces = PartitionBuffers()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values()) + self._pieces.nbytes

    def _buffer(self, name: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        shape = tuple(t.shape)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda"
            buf = torch.empty(shape, dtype=t.dtype, pin_memory=pin)
            buf.zero_()  # touch every page now, not during the first capture
            self._buffers[name] = buf
        return buf

    def _copy(self, name: str, t: torch.Tensor, by_id: dict, by_name: dict, ready: dict) -> None:
        buf = self._buffer(name, t)
        src = t.detach()
        if src.device.type == "cuda":
            buf.copy_(src, non_blocking=True)
            ready[name] = torch.cuda.Event()
            ready[name].record()
        else:
            buf.copy_(src)
        by_id[id(t)] = by_name[name] = buf

    def prepare(self, model: nn.Module) -> int:
        """Allocate every buffer a capture of ``model`` will need; returns the bytes allocated.
        A partitioned model gets buffers for this rank's pieces only (not collective)."""
        if needs_gather(model):
            for p, piece in pieces(model):
                if copied_at_capture(p, piece):
                    self._pieces.buffer(piece)
            for name, t in _captured_tensors(model, parameters=False):
                self._buffer(name, t)
            return self.nbytes
        for name, t in _captured_tensors(model):
            self._buffer(name, t)
        return self.nbytes

    def capture(self, model: nn.Module, stats: bool = False) -> Capture:
        """Copy what training changes into the buffers and record every other tensor's version.
        With ``stats``, also the fp64 norm and sum of each trainable parameter, computed where
        it lives (the GPU) while it is whole. Collective when the model is partitioned (the
        trainable tensors are gathered).

        On a GPU the copies are queued on the training stream, so the next optimizer step can
        only run after they have read the parameters; each copy gets an event, and a reader of
        the buffer waits for its own event only (:meth:`Capture.wait`), so hashing starts while
        later copies are still in flight."""
        by_id: dict[int, torch.Tensor] = {}
        by_name: dict[str, torch.Tensor] = {}
        ready: dict[str, torch.cuda.Event] = {}
        if needs_gather(model):
            try:
                found = pieces(model)
            except UnsupportedShardingError as e:
                raise UnsupportedShardingError(
                    f"a capture copies this rank's partition of each parameter, but {e} Export it with export_hf, or "
                    "let HFExportHook gather it in the training thread (mode 'gathered').") from e
            return self._capture_pieces(model, found)
        items = list(_captured_tensors(model))
        trained = [(n, t) for n, t in items if isinstance(t, nn.Parameter) and t.requires_grad]
        trainable = [n for n, _ in trained]
        # statistics first, fetched without waiting, then the copies: reading the statistics
        # does not wait for the copies, and the copies do not wait for the host
        stats_at = _queue_stats([t for _, t in trained] if stats else [])
        # largest first: the hashing of the large tensors, which takes longest, starts first
        for name, t in sorted(items, key=lambda it: -it[1].numel() * it[1].element_size()):
            self._copy(name, t, by_id, by_name, ready)
        found = dict(zip(trainable, stats_at(), strict=True)) if stats else {}
        versions = {}
        for name, p in model.named_parameters():
            if id(p) not in by_id:
                versions[clean_name(name)] = (p, p._version)
        return Capture(by_id, by_name, versions, sum(b.numel() * b.element_size() for b in by_name.values()),
                       trainable, found, ready)


    def _capture_pieces(self, model: nn.Module, found: list[tuple[nn.Parameter, Piece]]) -> Capture:
        """Partitioned parameters: copy this rank's piece of what training changes (and the
        buffers, whole), and record the version of every piece read live later. Local: no
        collective, no gather."""
        by_id: dict[int, torch.Tensor] = {}
        by_name: dict[str, torch.Tensor] = {}
        ready: dict[str, torch.cuda.Event] = {}
        copied: dict[int, tuple[Piece, torch.Tensor]] = {}
        live: dict[int, Piece] = {}
        trainable = []
        for name, p in _whole_trainable(model):  # a trainable parameter outside the engine's sharding
            self._copy(name, p, by_id, by_name, ready)
            trainable.append(name)
        for p, piece in found:
            if not copied_at_capture(p, piece):
                live[id(p)] = piece
                continue
            buf = self._pieces.buffer(piece)
            src = piece.read()
            buf.copy_(src, non_blocking=src.device.type == "cuda")
            if src.device.type == "cuda":
                ready[piece.name] = torch.cuda.Event()
                ready[piece.name].record()
            copied[id(p)] = (piece, buf)
            if p.requires_grad:
                trainable.append(piece.name)
        for name, t in _captured_tensors(model, parameters=False):
            self._copy(name, t, by_id, by_name, ready)
        versions = {piece.name: (piece.storage, piece.storage._version) for piece in live.values() if not piece.shared}
        checked = [piece for piece in live.values() if piece.shared]  # one version counter with trained slices
        nbytes = sum(b.numel() * b.element_size() for _, b in copied.values()) + \
            sum(b.numel() * b.element_size() for b in by_name.values())
        # dict.items: the raw entries (DeepSpeed's ZeROOrderedDict gathers a parameter read by key in a forward)
        module_params = {id(m): dict(dict.items(m._parameters)) for m in model.modules()}
        return Capture(by_id, by_name, versions, nbytes, trainable, {}, ready, copied, live, True, module_params,
                       checked, _queue_stats([piece.read() for piece in checked]))


def _whole_trainable(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in partitioned_parameters(model):
        if p.requires_grad and not is_partitioned(p):
            yield name, p


def _queue_stats(tensors: list[torch.Tensor]):
    """Queue the fp64 statistics of ``tensors`` and their transfer to the host; returns a function
    that waits for that transfer alone and gives the (norm, sum) pairs."""
    if not tensors:
        return lambda: []
    pending = [tensor_stats_pending(t) for t in tensors]
    flat = torch.stack([x for squares, total in pending for x in (squares.sqrt(), total)])  # as stats_values
    if flat.device.type != "cuda":
        on_host = flat.tolist()
        return lambda: [(on_host[2 * i], on_host[2 * i + 1]) for i in range(len(tensors))]
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def values():
        done.synchronize()
        v = host.tolist()
        return [(v[2 * i], v[2 * i + 1]) for i in range(len(tensors))]

    return values


def fingerprint_capture(capture: Capture, workers: int | None = None) -> dict[str, Fingerprint]:
    """Fingerprints of the captured trainable parameters, hashed on a pool of threads (xxhash
    releases the GIL), largest first, from the host copies. Equal, digest for digest, to
    fingerprinting the live parameters at the moment of the capture."""
    names = sorted(capture.trainable, key=lambda n: -capture.by_name[n].numel() * capture.by_name[n].element_size())

    def one(name: str) -> Fingerprint:
        capture.wait(name)
        buf = capture.by_name[name]
        norm, total = capture.stats.get(name) or tensor_stats(buf)
        return Fingerprint(name=name, dtype=dtype_name(buf.dtype), shape=tuple(int(s) for s in buf.shape),
                           digest=digest_tensor(name, buf), norm=norm, sum=total)

    if not names:
        return {}
    with Workers(min(len(names), workers or min(8, os.cpu_count() or 1)), "sa2va_hooks-fingerprint") as pool:
        return dict(zip(names, pool.map(one, names), strict=True))
