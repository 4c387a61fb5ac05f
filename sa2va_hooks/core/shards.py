"""The writer's planning half: which tensors go into which file, which rank writes each file,
and every file's safetensors header, all decided from names, shapes and dtypes before a byte of
tensor data exists.

Why apart from the writing: the plan is pure (no file, no thread, no torch.distributed), so every
rank computes the same shards, owners and headers on its own, and the plan is tested on dummy sizes
(``tests/core/test_shards.py``). The headers being final from the start is what lets
:class:`~sa2va_hooks.core.writer.ShardWriter` stream a file tensor by tensor, and lets the export
compare a previous snapshot's shard header byte for byte before hard-linking it.
"""
from __future__ import annotations

import dataclasses
import json
import re
import struct
from typing import Protocol, Sequence

import torch

from .entry import nbytes_of
from .errors import BadTypeError, BadValueError
from .vocab import SAFETENSORS_CODES, SHARD_METADATA, SINGLE_FILE

_ST_DTYPES = {getattr(torch, name): code for name, code in SAFETENSORS_CODES.items()}

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2**31, exactly as transformers' ``max_shard_size`` reads it,
    including its one surprise: a lower-case final ``b`` means bits ('5Gb' and '5gb' are 5e9 / 8
    bytes), so that a size copied from a transformers call gives the same shards here."""
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]I?)?B)?\s*", size.upper()) if isinstance(size, str) else None
    if not m or float(m.group(1)) <= 0:
        raise BadValueError(f"max_shard_size {size!r} is not a size; use a positive int of bytes or e.g. '5GB', "
                            "'500MiB'.")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"])
    bits = m.group(2) is not None and "I" not in m.group(2) and m.group(2) != "B" and size.rstrip().endswith("b")
    return n // 8 if bits else n


class Slot(Protocol):
    """What the shard planning and writing read of a tensor: the export passes its
    :class:`~sa2va_hooks.core.entry.TensorEntry` objects, the writer's own tests
    :class:`TensorSlot`. The writer checks plan order by ``==``, identity for an entry."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def nbytes(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """The least a tensor needs to be planned into a shard (the writer's tests use it)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    files: list[tuple[str, list[Slot]]]  # in write order

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for _, slots in self.files for s in slots)

    @property
    def weight_map(self) -> dict[str, str]:
        return {s.name: f for f, slots in self.files for s in slots}


def plan_shards(slots: Sequence[Slot], max_shard_size: int | str) -> ShardPlan:
    """Greedy, order-preserving split, as transformers does: a tensor larger than the limit
    gets a shard of its own rather than being refused."""
    limit = parse_size(max_shard_size)
    groups: list[list[Slot]] = [[]]
    size = 0
    for s in slots:
        if groups[-1] and size + s.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    if len(groups) == 1:
        return ShardPlan([(SINGLE_FILE, groups[0])])
    n = len(groups)
    return ShardPlan([(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)])


def plan_shard_groups(groups: Sequence[Sequence[Slot]], max_shard_size: int | str) -> ShardPlan:
    """Shards that never mix groups: each group is split on its own, in its own order, and the
    files are numbered group after group. Exported with the frozen tensors as the first group,
    the frozen shards hold the same tensors in the same order at every export, so their bytes
    repeat and a later export can hard-link them.

    Two non-empty groups never share a file, even when the whole model fits one shard: the limit
    caps a file's size, it is no reason to merge groups. Merging them when the model fits (as this
    did before) left nothing to link for every model under ``max_shard_size`` (5GB by default), so
    each export rewrote its frozen bytes. Only a single group (nothing frozen, or nothing trained)
    is planned as :func:`plan_shards` plans it, into ``model.safetensors`` when it fits."""
    groups = [list(g) for g in groups if g]
    if len(groups) <= 1:
        return plan_shards([s for g in groups for s in g], max_shard_size)
    parts = [slots for g in groups for _, slots in plan_shards(g, max_shard_size).files]
    n = len(parts)
    return ShardPlan([(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(parts)])


def safetensors_header(slots: Sequence[Slot]) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding ``slots`` in this order."""
    header: dict = {"__metadata__": dict(SHARD_METADATA)}
    offset = 0
    for s in slots:
        if s.dtype not in _ST_DTYPES:
            raise BadTypeError(f"tensor '{s.name}' has dtype {s.dtype}, which safetensors cannot store")
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def assign_shards(plan: ShardPlan, world: int) -> dict[str, int]:
    """Which rank writes which file: the largest files first, each to the least loaded rank
    (ties to the lowest rank). Deterministic, so every rank computes the same assignment."""
    load = [0] * world
    owner: dict[str, int] = {}
    sizes = {f: sum(s.nbytes for s in slots) for f, slots in plan.files}
    for fname in sorted(sizes, key=lambda f: (-sizes[f], f)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[fname] = r
        load[r] += sizes[fname]
    return owner
