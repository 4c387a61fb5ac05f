"""Exports on a thread of their own: the job that runs one, and the bounded queue that carries
gathered tensors from the training thread to it (ZeRO-3, FSDP).

Why a thread and a byte budget (decisions 50-54): training should stall only for what must happen
while no step runs (a capture of the trainable tensors, or the gathers and host copies of a
partitioned model); merging the rest, writing, reading back and publishing go on beside it. The
queue bounds the host memory that costs, and a writer that takes nothing for the group's timeout
(a stuck filesystem) never holds training longer than that.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from .errors import ExportFailedError, InternalError
from .manifest import ExportManifest

if TYPE_CHECKING:
    from .pipeline import ExportTask


class FrontFailedError(ExportFailedError, RuntimeError):
    """The training-thread half of an export failed; the training thread reported it already."""


class _ByteQueue:
    """Tensors handed from the training thread to the writer thread, holding at most ``budget``
    bytes at a time (a single tensor larger than that still passes, alone)."""

    def __init__(self, budget: int, timeout_s: float | None = None) -> None:
        self.budget, self.used, self.timeout_s = budget, 0, timeout_s
        self.items: list = []
        self.closed, self.error = False, None
        self.abandoned = self.before_close = False
        self.cond = threading.Condition()

    def abandon(self) -> None:
        """The writer will take nothing more: puts return at once, dropping their items."""
        with self.cond:
            self.abandoned = True
            self.before_close = not self.closed  # the writer died before the producer finished
            self.items.clear()
            self.cond.notify_all()

    def put(self, item, nbytes: int) -> None:
        with self.cond:
            room = lambda: not self.used or self.used + nbytes <= self.budget or self.abandoned  # noqa: E731
            if not self.cond.wait_for(room, self.timeout_s):
                # the writer is stuck (a hung filesystem): training does not wait longer for it
                self.error = TimeoutError(f"the export's writer took nothing for {self.timeout_s:g} s (a stuck "
                                          "filesystem?); the training thread stopped handing it tensors")
                self.abandoned = self.closed = True
                self.items.clear()
                self.cond.notify_all()
            if self.abandoned:  # the writer is gone: never block the training thread on it
                return
            self.items.append(item)
            self.used += nbytes
            self.cond.notify_all()

    def release(self, nbytes: int) -> None:
        """The consumer is done with an item's bytes."""
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.closed, self.error = True, self.error or error
            self.cond.notify_all()

    def __iter__(self):
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait()
                if not self.items:
                    return
                item = self.items.pop(0)
            yield item


class Waitable(Protocol):
    """What a queued export waits for before it runs: an :class:`ExportJob`, an ``ExportHandle``,
    or a caller's wrapper of one (HFExportHook's logs when the wait ends)."""

    def wait(self, timeout: float | None = None) -> bool: ...


class ExportJob:
    """One export on a thread of its own (not a daemon: the interpreter waits for it at exit, so
    a snapshot being written is finished, not torn). On a GPU it works on a CUDA stream of its
    own, so its copies and merges never queue behind training's kernels.

    ``start(after=job)`` queues it behind another export: its thread starts now, waits for
    ``after`` to end (well or not), then runs. Why: a checkpoint that comes while the previous
    export still runs is captured and prepared at once (in the training thread, which must not
    wait), and two exports never write at the same time (decision 58)."""

    def __init__(self, task: ExportTask, on_done: Callable[["ExportJob"], None] | None = None) -> None:
        self.task, self.on_done = task, on_done
        self.manifest: ExportManifest | None = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self.queued_s = 0.0  # how long its thread waited for the export it was queued behind
        self._after: Waitable | None = None
        self._thread = threading.Thread(target=self._main, name=f"sa2va_hooks-export-{task.out_dir.name}")

    @property
    def out_dir(self) -> Path:
        return self.task.out_dir

    def start(self, after: Waitable | None = None) -> "ExportJob":
        """Start the thread; with ``after``, it first waits for that export to end, however it ends.
        A parameter of ``start``, not of the constructor, because the job is built where it is
        prepared (``pipeline.py``) and queued where it is started. Never for a gathered export:
        its training thread feeds the writer, and would wait too."""
        self._after = after
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the export; True once it has finished (successfully or not)."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> ExportManifest:
        """Wait, then return the manifest or raise the export's error."""
        self.wait()
        if self.error is not None:
            raise self.error
        if self.manifest is None:
            raise InternalError(f"the export to {self.out_dir} was never started")
        return self.manifest

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            if self._after is not None:
                self._after.wait()  # the previous export's outcome does not matter here
                self.queued_s, t0 = time.perf_counter() - t0, time.perf_counter()
            with _own_stream(self.task.model):
                self.manifest = self.task.run()
        except BaseException as e:  # noqa: BLE001 - kept for result() and the callback; a thread has no caller
            self.error = e
        finally:
            self.task.abandon_front()
        self.seconds = time.perf_counter() - t0
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # noqa: BLE001 - a callback bug must not vanish silently
                logging.getLogger("sa2va_hooks").exception("the export's completion callback failed")


def _own_stream(model: nn.Module):
    device = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    if device is None:
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))
