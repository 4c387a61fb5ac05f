"""Full, logical views of parameters that the training engine shards.

The exporter and the fingerprints must see every parameter whole, whatever the launch mode:

- single process, DDP, DeepSpeed ZeRO-1/2: every rank holds every parameter whole; nothing to do;
- DeepSpeed ZeRO-3: outside ``deepspeed.zero.GatheredParameters`` a parameter is an empty
  ``(0,)`` tensor and its logical shape is ``p.ds_shape``. Gathering is collective: every rank
  must enter the same gather in the same order, so callers walk the model in one fixed order on
  every rank and gather one module's own parameters at a time (peak extra memory: one module);
- FSDP (torch's FullyShardedDataParallel, as mmengine's FSDPStrategy wraps it, with
  ``use_orig_params=True``): outside ``summon_full_params`` an original parameter is a 1-D view
  of this rank's part of its unit's flat shard (often empty). :func:`index_fsdp` records, on each
  parameter, the FSDP unit that manages it and its unsharded shape (from the unit's
  FlatParameter); :func:`gathered` then summons exactly those units, ``recurse=False`` and
  ``writeback=False`` (collective; peak extra memory: one unit). FSDP wrappers are transparent in
  names (``_fsdp_wrapped_module.`` is dropped), as in FSDP's own state dicts. FSDP with
  ``use_orig_params=False`` and FSDP2 (DTensor parameters) are refused with a clear error.

We never assemble the model on one rank and never ask DeepSpeed for its consolidated 16-bit
state dict: the engine's own gather, one module at a time, is the only way in.

A tensor that is empty, or whose shape is not its logical shape, is never fingerprinted or
written: :func:`check_full` raises :class:`ShardedTensorError` naming it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from .errors import BadInputError


class ShardedTensorError(BadInputError, ValueError):
    """A tensor is a shard or a placeholder, not the whole logical tensor."""


class UnsupportedShardingError(BadInputError, TypeError):
    """The model is sharded by an engine whose gather sa2va_hooks does not implement."""


_FSDP_UNIT = "_sa2va_fsdp_unit"  # set on each original parameter by index_fsdp
_FSDP_SHAPE = "_sa2va_fsdp_shape"
_FSDP_INDEX = "_sa2va_fsdp_index"  # the parameter's position in its unit's FlatParameter
FSDP_WRAPPED = "_fsdp_wrapped_module"


def is_zero3_partitioned(t: torch.Tensor) -> bool:
    """DeepSpeed ZeRO-3 marks every partitioned parameter with ``ds_id`` and ``ds_shape``."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def is_fsdp_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, _FSDP_UNIT)


def is_partitioned(t: torch.Tensor) -> bool:
    return is_zero3_partitioned(t) or is_fsdp_sharded(t)


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape the tensor has in the model, gathered or not."""
    if is_zero3_partitioned(t):
        return tuple(int(s) for s in t.ds_shape)
    if is_fsdp_sharded(t):
        return getattr(t, _FSDP_SHAPE)
    return tuple(int(s) for s in t.shape)


def needs_gather(model: nn.Module) -> bool:
    """Whether reading this model's parameters needs a collective gather (ZeRO-3, FSDP). The
    answer is the same on every rank, because every rank wraps the same model the same way."""
    index_fsdp(model)
    return any(is_partitioned(p) for p in model.parameters())


def _fsdp_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return None
    return FullyShardedDataParallel


def is_fsdp_module(module: nn.Module) -> bool:
    cls = _fsdp_class()
    return cls is not None and isinstance(module, cls)


def index_fsdp(model: nn.Module) -> None:
    """Record on every original parameter the FSDP unit that manages it and its unsharded shape.
    Uses the FlatParameter's ``_params``/``_shapes`` (torch's FSDP1 internals, stable from torch
    2.1 to 2.14): FSDP exposes no public way to know an original parameter's shape while sharded."""
    for unit in model.modules():
        if not is_fsdp_module(unit):
            continue
        flat = getattr(unit, "_flat_param", None)
        if flat is None:
            continue
        params = getattr(flat, "_params", None)
        if params is None:
            raise UnsupportedShardingError(
                f"FSDP unit {type(unit._fsdp_wrapped_module).__name__} was wrapped with use_orig_params=False: its "
                "original parameters are not visible, so sa2va_hooks cannot fingerprint or export them. Use "
                "use_orig_params=True (mmengine's MMFullyShardedDataParallel default, and required for LoRA).")
        for i, (p, shape) in enumerate(zip(params, flat._shapes, strict=True)):
            setattr(p, _FSDP_UNIT, unit)
            setattr(p, _FSDP_SHAPE, tuple(int(s) for s in shape))
            setattr(p, _FSDP_INDEX, i)


def fsdp_slot(p: torch.Tensor):
    """``(flat_param, i)``: the FlatParameter that holds ``p`` (after :func:`index_fsdp`) and
    ``p``'s position in it, which indexes its ``_shard_param_infos`` (torch's FSDP1 internals)."""
    return getattr(p, _FSDP_UNIT)._flat_param, getattr(p, _FSDP_INDEX)


def refuse_unsupported_sharding(model: nn.Module) -> None:
    """Shards we cannot gather are refused rather than fingerprinted or written as one rank's
    slice: FSDP2's DTensor parameters and FSDP1 flat parameters without original parameters."""
    index_fsdp(model)
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or type(getattr(p, "data", p)).__name__ == "DTensor":
            raise UnsupportedShardingError(
                f"parameter '{name}' is a {type(p).__name__} shard "
                f"({'FSDP2/DTensor' if 'DTensor' in repr(type(p.data)) else 'FSDP flat parameter'}); "
                "sa2va_hooks gathers DeepSpeed ZeRO-3 and FSDP (use_orig_params=True) shards, not this kind, and would "
                "otherwise fingerprint and export one rank's slice. Train with DeepSpeed ZeRO-2/3, DDP or mmengine's "
                "FSDPStrategy, or export offline from a full checkpoint.")


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model has it (FSDP's own state dicts do the same)."""
    return name.replace(FSDP_WRAPPED + ".", "")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Make ``params`` whole for the duration of the block, read-only (nothing is written back).
    Collective under ZeRO-3 and FSDP: every rank must enter with the same list. A no-op for
    parameters that are not partitioned."""
    params = [p for p in params if p is not None]
    zero3 = [p for p in params if is_zero3_partitioned(p)]
    units: list[nn.Module] = []
    for p in params:
        unit = getattr(p, _FSDP_UNIT, None)
        if unit is not None and all(unit is not u for u in units):
            units.append(unit)
    if not zero3 and not units:
        yield
        return
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed
            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        for unit in units:
            stack.enter_context(_fsdp_class().summon_full_params(unit, recurse=False, writeback=False))
        yield


def check_full(name: str, t: torch.Tensor, expected: tuple[int, ...] | None = None) -> None:
    """Refuse an empty tensor, or one whose shape is not the logical shape (a ZeRO-3 placeholder
    read outside a gather, an FSDP shard): fingerprinting or exporting it would record nothing
    of what was trained."""
    shape = tuple(int(s) for s in t.shape)
    want = expected if expected is not None else logical_shape(t)
    if shape != tuple(want):
        raise ShardedTensorError(
            f"tensor '{name}' has shape {list(shape)} but its logical shape is {list(want)}: it is a shard or a "
            "placeholder of a partitioned parameter, not the trained tensor. It was not fingerprinted or written. "
            "This is a bug in how sa2va_hooks gathers this engine's parameters; please report it.")
    if t.numel() == 0:
        raise ShardedTensorError(
            f"tensor '{name}' has no elements (shape {list(shape)}); an empty tensor is never a trained weight, so "
            "nothing is fingerprinted or exported from it. If the model really has an empty parameter, remove it.")


def iter_whole_parameters(model: nn.Module, keep: Callable[[torch.Tensor], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` for every parameter ``keep`` accepts, meant to be whole while the
    caller holds it (the generator is suspended inside the gather of its module; the caller
    checks with :func:`check_full`). Order and gathers are those of ``named_modules``: identical
    on every rank. Shared parameters are yielded once, under the first name, as
    ``named_parameters`` does."""
    refuse_unsupported_sharding(model)
    seen: set[int] = set()
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None and id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        with gathered([p for _, p in own]):
            for n, p in own:
                if keep(p):
                    yield clean_name(f"{mname}.{n}" if mname else n), p
