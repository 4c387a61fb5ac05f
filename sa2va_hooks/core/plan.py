"""Step 1 of an export, the plan: everything decided before any tensor is produced.

The model is walked once (what is merged, which parameters are tied), the converter names every
tensor, and the shards are planned from names, shapes and dtypes: no tensor data is read, so the
plan is cheap, identical on every rank, and every refusal that can be made early (an unknown dtype,
an empty tensor, a converter that is not ready) is made before a byte is written.

The :class:`ConverterProtocol` is what the pipeline asks of a converter; this module imports no
converter and no mmengine.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from .entry import TensorEntry, nbytes_of
from .errors import BadValueError
from .host import reserve
from .merge import WalkResult, plan_merged_tensors
from .shards import ShardPlan, plan_shard_groups
from .sharding import ShardedTensorError, logical_shape
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


class ConverterProtocol(Protocol):
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


def parse_dtype(dtype: Any) -> torch.dtype | None:
    """The export's ``dtype`` option as a torch dtype; ``None`` keeps each tensor as in memory."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in KEEP_DTYPE:
        return None
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise BadValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto' (keep as in memory)") \
            from None


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


def plan_export(model: nn.Module, conv: ConverterProtocol, dt: torch.dtype | None,
                max_shard_size: int | str) -> ExportPlan:
    """Walk, name and shard the export. The frozen-only tensors are sharded as a group of their
    own, first, so their files repeat from one export to the next and can be hard-linked."""
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


def _untie_for(conv: ConverterProtocol, walk: WalkResult) -> WalkResult:
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


def _refuse_empty(entries: Mapping[str, TensorEntry]) -> None:
    """An empty tensor is never a trained weight: under ZeRO-3 it is what a partitioned
    parameter looks like outside a gather. Refuse before writing anything."""
    empty = [n for n, e in entries.items() if 0 in e.shape]
    if empty:
        raise ShardedTensorError(f"{len(empty)} tensor(s) would be exported with no elements, e.g. {empty[:5]}; an "
                                 "export of empty tensors holds nothing that was trained, so none was written.")
