"""The ranks that export together, over plain ``torch.distributed`` (no mmengine).

Every function here is collective when a process group is initialised: every rank must call it
at the same point, in the same order. Single-process runs get the same API with no
communication, so callers have one code path.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class RankGroup:
    rank: int
    world: int
    # the process group the exchanges use; None is the default (training) group. A background
    # export uses a gloo group of its own, so its exchanges never interleave with training's.
    pg: Any = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def current(cls) -> "RankGroup":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)

    @classmethod
    def background(cls) -> "RankGroup":
        """Every rank in a new gloo group, for exchanges made from a background thread while the
        training thread keeps using the default group (NCCL or gloo). Collective: every rank
        must call it at the same point (HFExportHook does, in ``before_train``)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(0, 1)
        return cls(dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (collective)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (collective)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.pg)
        return box[0]


@dataclasses.dataclass
class RankFailure:
    rank: int
    error: str  # "Type: message"

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.error}"


class RankFailedError(RuntimeError):
    """One or more ranks failed their part of a collective piece of work; every rank raises this
    with the same message, so every rank's log names the rank and the cause."""

    def __init__(self, failures: list[RankFailure], what: str) -> None:
        self.failures = failures
        lines = "; ".join(str(f) for f in failures)
        super().__init__(f"{what} failed on {len(failures)} rank(s): {lines}")


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def agree(group: RankGroup, error: BaseException | str | None, what: str) -> None:
    """Collective status check: raises :class:`RankFailedError` on every rank if any rank
    passed an error, so all ranks take the same branch afterwards."""
    if group.world == 1 and isinstance(error, BaseException):
        raise error  # one process: its own exception, with its own type, is the clearest report
    msg = None if error is None else error if isinstance(error, str) else describe(error)
    failures = [RankFailure(r, m) for r, m in enumerate(group.all_gather(msg)) if m is not None]
    if failures:
        raise RankFailedError(failures, what)
