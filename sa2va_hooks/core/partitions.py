"""Partitioned parameters read from each rank's own partition, assembled in the background.

Under DeepSpeed ZeRO-3 and FSDP no rank holds a whole parameter; reading one whole takes a
collective gather over the training's process group, which only the training thread may enter
(decision 54). Gathering the model at every checkpoint held training for seconds (10.6-11.5 s at
7.6B on 2 H200s). Here nothing is gathered over the training group:

- at the checkpoint each rank copies only what it holds locally and what training will change next:
  its partition of every trainable parameter (DeepSpeed's ``ds_tensor``, the slice of FSDP's local
  flat shard), into host buffers allocated once (:class:`PartitionBuffers`). No collective, no
  kernel but the copies;
- the frozen partitions never change, so they are read later, by the export's thread, from the
  live partition, never copied at a checkpoint. What proves afterwards that nothing wrote to one:
  its version counter, recorded at the capture; or, for the frozen slices of an FSDP unit that
  also holds trainable parameters (one storage, so one version counter, that every optimizer step
  bumps), their content: fp64 norm and sum queued on the GPU at the capture, computed again after
  the export (decision 63). Copying those slices at every capture cost 12.2 GiB of host buffers
  per rank and a D2H copy of the whole local shard at 7.6B on 2 H200s. On the CPU (FSDP's CPU
  offload) the statistics would cost far more than the copy, so there they are still copied
  (:func:`~.snapshot.checks_by_content`);
- the export's thread assembles each whole tensor on the rank that writes it from every rank's
  piece, with ``gather`` over a gloo process group of its own (:class:`PieceExchange`, made once
  before training), never over the training group. Every rank walks the same tensors in the same
  order, so every rank enters the same gathers; a rank that failed keeps entering them (sending
  zeros) until the walk ends, and the export's agreement then fails it everywhere.

Per-rank host memory: the captured partitions plus what is assembled for one tensor at a time.
"""
from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import ExportFailedError
from .sharding import (UnsupportedShardingError, clean_name, fsdp_slot, index_fsdp, is_fsdp_sharded,
                       is_zero3_partitioned, logical_shape)


@dataclasses.dataclass(frozen=True)
class Piece:
    """This rank's part of one partitioned parameter: elements ``[start, start + length)`` of the
    flattened logical tensor. ``read()`` returns it live (a 1-D view of the engine's storage);
    ``storage`` is the tensor whose version counter changes when anything writes to it; ``shared``
    says that storage also holds trainable parameters (so its version says nothing about this one)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    length: int
    storage: torch.Tensor
    offset: int  # where the piece starts in ``storage``
    shared: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> torch.Tensor:
        return self.storage.detach().reshape(-1).narrow(0, self.offset, self.length)


def piece_of(name: str, p: torch.Tensor) -> Piece:
    """This rank's :class:`Piece` of a ZeRO-3 or FSDP parameter (refusing layouts it cannot read)."""
    shape = logical_shape(p)
    if is_zero3_partitioned(p):
        part = p.ds_tensor
        where = str(getattr(part, "final_location", None) or "")
        if "nvme" in where or getattr(part, "ds_quant_scale", None) is not None:
            how = "on NVMe" if "nvme" in where else "quantized"
            raise UnsupportedShardingError(
                f"parameter '{name}' is partitioned by ZeRO-3 with its partition {how}; its "
                "partition cannot be copied as it is. The export gathers it in the training thread instead.")
        size = int(getattr(part, "ds_numel", part.numel()))
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
        numel = math.prod(shape)
        start = min(size * rank, numel)
        return Piece(name, shape, p.dtype, start, max(0, min(size, numel - start)), part, 0, False)
    if is_fsdp_sharded(p):
        flat, i = fsdp_slot(p)
        info = flat._shard_param_infos[i]
        shared = any(q.requires_grad for q in flat._params) and not p.requires_grad
        if not info.in_shard:
            return Piece(name, shape, p.dtype, 0, 0, flat._local_shard, 0, shared)
        return Piece(name, shape, p.dtype, int(info.intra_param_start_idx), int(info.numel_in_shard),
                     flat._local_shard, int(info.offset_in_shard), shared)
    raise UnsupportedShardingError(f"parameter '{name}' is not partitioned; it has no piece to read")


def partitioned_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter once, under its first (clean) name, in ``named_modules`` order: the same
    order on every rank, and the order :func:`~.sharding.iter_whole_parameters` walks."""
    index_fsdp(model)
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for n, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield clean_name(f"{mname}.{n}" if mname else n), p


def pieces(model: nn.Module) -> list[tuple[nn.Parameter, Piece]]:
    """This rank's :class:`Piece` of every partitioned parameter, in one walk. Raises
    :class:`UnsupportedShardingError` (naming the parameter) when one cannot be read as it is."""
    try:
        return [(p, piece_of(name, p)) for name, p in partitioned_parameters(model)
                if is_zero3_partitioned(p) or is_fsdp_sharded(p)]
    except (AttributeError, IndexError) as e:  # an FSDP/DeepSpeed layout other than the one read here
        raise UnsupportedShardingError(f"this engine's partition layout is not one sa2va_hooks reads ({e})") from e


def is_captured(p: nn.Parameter, piece: Piece) -> bool:
    """Whether this piece is trainable, so every capture copies it. A frozen one is read live by the
    export, checked by version; or, when ``piece.shared``, by content on a GPU and copied on the CPU
    (:func:`~.snapshot.copied_at_capture`)."""
    return p.requires_grad


def partition_support(model: nn.Module) -> str | None:
    """None when every parameter's local piece can be read (then exports need no gather in the
    training thread), else why not."""
    try:
        pieces(model)
    except UnsupportedShardingError as e:
        return str(e)
    return None


class PartitionBuffers:
    """Host buffers for the pieces a capture copies (the trainable parameters' pieces; on the CPU also
    the frozen pieces that share storage with them), allocated once and reused."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def buffer(self, piece: Piece) -> torch.Tensor:
        buf = self._buffers.get(piece.name)
        if buf is None or buf.numel() != piece.length or buf.dtype != piece.dtype:
            buf = torch.empty(piece.length, dtype=piece.dtype, pin_memory=piece.storage.device.type == "cuda")
            buf.zero_()  # touch every page now, not during the first capture
            self._buffers[piece.name] = buf
        return buf


class PieceExchange:
    """A gloo process group of the export's own, for the pieces (never the training group, which
    the training thread uses meanwhile). Made once, before training, on every rank (collective)."""

    def __init__(self, group, rank: int, world: int) -> None:
        self.group, self.rank, self.world = group, rank, world

    @classmethod
    def create(cls, timeout_s: float) -> "PieceExchange":
        """Collective over the default group: every rank must call it at the same point."""
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(group, dist.get_rank(), dist.get_world_size())

    def layout(self, pieces: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Every rank's ``(start, length)`` list, in rank order (one small collective)."""
        out: list = [None] * self.world
        dist.all_gather_object(out, pieces, group=self.group)
        return out

    def all_gather(self, obj):
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def assemble(self, mine: torch.Tensor | None, spans: list[tuple[int, int]], piece: Piece,
                 owner: int) -> torch.Tensor | None:
        """The whole tensor on ``owner`` (None elsewhere) from every rank's piece (``mine``: this
        rank's, on the host; None sends zeros, for a rank that already failed). ``spans`` are
        every rank's ``(start, length)``. Collective over this group."""
        es = torch.empty((), dtype=piece.dtype).element_size()
        width = max(length for _, length in spans) * es
        send = torch.zeros(max(width, 1), dtype=torch.uint8)
        if mine is not None and mine.numel():
            send[:mine.numel() * es].copy_(mine.contiguous().view(torch.uint8))
        if self.rank != owner:
            dist.gather(send, None, dst=owner, group=self.group)
            return None
        recv = [torch.empty_like(send) for _ in range(self.world)]
        dist.gather(send, recv, dst=owner, group=self.group)
        full = torch.empty(piece.numel * es, dtype=torch.uint8)
        for (start, length), got in zip(spans, recv, strict=True):
            full[start * es:(start + length) * es].copy_(got[:length * es])
        return full.view(piece.dtype).view(piece.shape)


class PieceExchangeError(ExportFailedError, RuntimeError):
    """Assembling a tensor from the ranks' pieces failed (a rank died, timed out, or sent a layout
    that does not cover the tensor)."""


def check_cover(name: str, spans: list[tuple[int, int]], numel: int) -> None:
    """The ranks' pieces of a tensor must cover each element exactly once: otherwise the engine's
    partitioning is not what this module reads, and the assembled tensor would be wrong."""
    covered = 0
    for start, length in sorted(s for s in spans if s[1]):
        if start != covered:
            break
        covered += length
    if covered != numel or sum(length for _, length in spans) != numel:
        raise PieceExchangeError(
            f"the ranks' partitions of '{name}' ({numel} elements) do not cover it exactly once: (start, length) per "
            f"rank {spans}. This engine's partitioning is not one sa2va_hooks reads; nothing was written from it. "
            "Export with HFExportHook(background=False) (gathers) and please report this.")
