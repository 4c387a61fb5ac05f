"""Full, logical views of parameters that the training engine shards.

The exporter and the fingerprints must see every parameter whole, whatever the launch mode:

- single process, DDP, DeepSpeed ZeRO-1/2: every rank holds every parameter whole; nothing to do;
- DeepSpeed ZeRO-3: outside ``deepspeed.zero.GatheredParameters`` a parameter is an empty
  ``(0,)`` tensor and its logical shape is ``p.ds_shape``. Gathering is collective: every rank
  must enter the same gather in the same order, so callers walk the model in one fixed order on
  every rank and gather one module's own parameters at a time (peak extra memory: one module);
- FSDP (flat parameters or DTensor): refused with a clear error for now (docs/decisions.md).

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


class ShardedTensorError(ValueError):
    """A tensor is a shard or a placeholder, not the whole logical tensor."""


class UnsupportedShardingError(TypeError):
    """The model is sharded by an engine whose gather sa2va_hooks does not implement."""


def is_zero3_partitioned(t: torch.Tensor) -> bool:
    """DeepSpeed ZeRO-3 marks every partitioned parameter with ``ds_id`` and ``ds_shape``."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape the tensor has in the model, gathered or not."""
    if is_zero3_partitioned(t):
        return tuple(int(s) for s in t.ds_shape)
    return tuple(int(s) for s in t.shape)


def needs_gather(model: nn.Module) -> bool:
    """Whether reading this model's parameters needs a collective gather (ZeRO-3). The answer is
    the same on every rank, because every rank wraps the same model the same way."""
    return any(is_zero3_partitioned(p) for p in model.parameters())


def refuse_unsupported_sharding(model: nn.Module) -> None:
    """FSDP keeps flat or DTensor shards that this exporter cannot gather yet; say so rather than
    write or fingerprint rank 0's slice."""
    for name, p in model.named_parameters():
        kind = type(p).__name__
        if "FlatParameter" in kind or "_flat_param" in name or type(getattr(p, "data", p)).__name__ == "DTensor":
            raise UnsupportedShardingError(
                f"parameter '{name}' is an FSDP shard ({kind}); sa2va_hooks gathers DeepSpeed ZeRO-3 shards but not "
                "FSDP ones yet, and would otherwise fingerprint and export one rank's slice. Train with DeepSpeed "
                "(--deepspeed deepspeed_zero2 or _zero3) or DDP, or export offline from the checkpoint.")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Make ``params`` whole for the duration of the block, read-only (``modifier_rank=None``:
    nothing is written back). Collective under ZeRO-3: every rank must enter with the same list.
    A no-op for parameters that are not partitioned."""
    params = [p for p in params if p is not None]
    if not any(is_zero3_partitioned(p) for p in params):
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
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


def module_own_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module._parameters.values() if p is not None]


def iter_whole_parameters(model: nn.Module, keep: Callable[[torch.Tensor], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` for every parameter ``keep`` accepts, each whole while the caller holds
    it (the generator is suspended inside the gather of its module). Order and gathers are those
    of ``named_modules``: identical on every rank. Shared parameters are yielded once, under the
    first name, as ``named_parameters`` does."""
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
                    full = f"{mname}.{n}" if mname else n
                    check_full(full, p)
                    yield full, p
