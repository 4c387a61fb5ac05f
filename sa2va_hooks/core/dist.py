"""The ranks that export together, over plain ``torch.distributed`` (no mmengine).

Every function here is collective when a process group is initialised: every rank must call it
at the same point, in the same order. Single-process runs get the same API with no
communication, so callers have one code path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import pickle
import time
from typing import Any, ClassVar

import torch.distributed as dist
from .errors import BadValueError, ExportFailedError

# How long a background export's rank waits for the others at one step, unless the caller says:
# long enough for rank 0's load check of a large model, short next to gloo's 30 minutes.
DEFAULT_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class RankGroup:
    """The ranks over the default (training) process group; background exports use a
    :class:`StoreGroup` instead, with the same methods."""

    rank: int
    world: int
    timeout_s: ClassVar[float | None] = None  # the process group's own (the job's) timeout applies

    @classmethod
    def current(cls) -> "RankGroup":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)

    @classmethod
    def background(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> "RankGroup | StoreGroup":
        """Every rank, for exchanges made from a background thread while the training thread keeps
        using the default group (NCCL or gloo): a :class:`StoreGroup` over the job's key-value
        store, with a timeout of its own. Not collective (it talks to nobody)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(0, 1)
        return StoreGroup(dist.get_rank(), dist.get_world_size(), timeout_s)

    def session(self, label: str) -> "RankGroup":
        """The group one export uses (a store group gives each export its own keys)."""
        return self

    def raise_if_abandoned(self) -> None:
        """Nobody gives up on a process-group exchange (it fails on every rank at once)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (collective)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (collective)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]


class StoreGroup:
    """The ranks, talking through the job's rendezvous key-value store (TCPStore under torchrun)
    instead of a process group, for background exports. Why not a gloo group: a gloo collective
    waits 30 minutes by default, then fails with a message that names no rank, and a timed-out
    group is left out of step for every later export. Here every exchange is a key per rank
    under a name of its own (``session`` per export, a counter per step), so:

    - a wait is bounded by ``timeout_s`` and its error names the ranks that did not answer;
    - the rank that gives up leaves a mark the others see at their next wait, so they stop
      too, saying who gave up and why, instead of each waiting its own timeout;
    - a late rank can never be paired with a later export's step: the names differ;
    - rank 0's last step (publishing) is one-way: it never waits for a rank that may be gone.

    Each rank creates the same sessions in the same order (the hook starts exports in the
    training thread, at the same checkpoint on every rank), so the names agree without talking.
    """

    _POLL_MAX_S = 0.2  # short keys are polled (store.wait logs a warning at every timeout)

    def __init__(self, rank: int, world: int, timeout_s: float = DEFAULT_TIMEOUT_S, store: Any = None,
                 prefix: str = "sa2va_hooks/export") -> None:
        if timeout_s <= 0:
            raise BadValueError(f"the background export timeout must be positive seconds, got {timeout_s}")
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.prefix = prefix
        self._sessions = 0
        self._steps = 0
        self._children: list["StoreGroup"] = []  # earlier sessions, whose keys rank 0 deletes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def session(self, label: str) -> "StoreGroup":
        """A fresh namespace for one export. Rank 0 first deletes the keys of the sessions before the
        previous one (see ``_forget_finished``)."""
        self._sessions += 1
        if self.is_main:
            self._forget_finished()
        child = StoreGroup(self.rank, self.world, self.timeout_s, self.store, f"{self.prefix}/{self._sessions}-{label}")
        self._children.append(child)
        return child

    def all_gather(self, obj: Any) -> list[Any]:
        keys = self._step_keys()
        with self._contact():
            self.store.set(keys[self.rank], pickle.dumps(obj))
            self._wait(keys)
            return [pickle.loads(self.store.get(k)) for k in keys]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        keys = self._step_keys()
        with self._contact():
            if self.rank == src:  # one-way: the source never waits for the others
                self.store.set(keys[src], pickle.dumps(obj))
                return obj
            self._wait([keys[src]])
            return pickle.loads(self.store.get(keys[src]))

    def raise_if_abandoned(self) -> None:
        """Raise if another rank has given up on this session (checked before publishing)."""
        if self.store.check([self._abandon_key]):
            raise RankFailedError([], "", detail=self._abandoned_message())

    def _abandoned_message(self) -> str:
        return (f"another rank gave up on this export ({self.store.get(self._abandon_key).decode(errors='replace')}); "
                "this rank stopped too, and nothing is published once a rank has given up")

    def abandon(self, why: str) -> None:
        """Tell the other ranks this rank has left this session (they stop at their next wait)."""
        self.store.set(self._abandon_key, f"rank {self.rank}: {why}")

    # -- internals -------------------------------------------------------------------------------
    @property
    def _abandon_key(self) -> str:
        return f"{self.prefix}/abandoned"

    def _step_keys(self) -> list[str]:
        self._steps += 1
        return [f"{self.prefix}/{self._steps}/{r}" for r in range(self.world)]

    def _wait(self, keys: list[str]) -> None:
        """Until every key is there; a rank that gave up (checked first: a late rank must not take
        the others' old keys for agreement) or the timeout ends the wait on this rank."""
        deadline = time.monotonic() + self.timeout_s
        pause = 0.001
        while True:
            self.raise_if_abandoned()
            if self.store.check(keys):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, self._POLL_MAX_S)
        missing = [int(k.rsplit("/", 1)[1]) for k in keys if not self.store.check([k])]
        why = f"rank(s) {', '.join(map(str, missing))} did not answer within {self.timeout_s:g} s (stuck, or dead)"
        self.abandon(why)
        raise RankTimeoutError(missing, f"rank {self.rank}: {why}", self.rank)

    @contextlib.contextmanager
    def _contact(self):
        """A store that stops answering (DistNetworkError, DistStoreError) is named as such."""
        try:
            yield
        except RankFailedError:
            raise
        except RuntimeError as e:
            raise RankFailedError([], "", detail=f"rank {self.rank} lost contact with the job's key-value store "
                                  f"({type(e).__name__}: {e}); rank 0 hosts it under torchrun: did rank 0 die? "
                                  "This rank published nothing.") from e

    def _forget_finished(self) -> None:
        """Delete the keys of every session but the last. The last is kept: rank 0 may have ended it
        (its final step is a one-way broadcast) while another rank still reads its final key, or it
        may still run (an export queued behind it, decision 58). Every earlier one is over on every
        rank, since a rank opens a session only when at most its previous one is in flight (every
        rank agrees on that first, in the training thread)."""
        *finished, last = self._children or [None]
        for child in finished:
            keys = [f"{child.prefix}/{i}/{r}" for i in range(1, child._steps + 2) for r in range(self.world)]
            for key in keys + [child._abandon_key]:
                try:
                    self.store.delete_key(key)
                except RuntimeError:  # a store without deletion: the keys stay (small), nothing breaks
                    break
        self._children = [last] if last is not None else []


@dataclasses.dataclass
class RankFailure:
    rank: int
    error: str  # "Type: message"

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.error}"


class RankFailedError(ExportFailedError, RuntimeError):
    """One or more ranks failed their part of a collective piece of work; every rank raises this
    with the same message, so every rank's log names the rank and the cause."""

    def __init__(self, failures: list[RankFailure], what: str, detail: str | None = None) -> None:
        self.failures = failures
        lines = "; ".join(str(f) for f in failures)
        super().__init__(detail if detail is not None else f"{what} failed on {len(failures)} rank(s): {lines}")


class RankTimeoutError(RankFailedError):
    """Some ranks did not reach a step of a background export in time; this rank gave up on it."""

    def __init__(self, missing: list[int], why: str, rank: int = 0) -> None:
        self.missing = missing
        outcome = ("this rank gave up on the export and removed what it had staged; nothing was published" if rank == 0
                   else "this rank gave up on the export; rank 0 publishes nothing once a rank has given up (it "
                   "checks before publishing), and removes the staging when it sees that")
        super().__init__([], "", detail=f"{why}; {outcome}. Raise HFExportHook(timeout_s=...) if exports of this "
                         "model legitimately take longer at one step (rank 0's load check of a very large model).")


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
