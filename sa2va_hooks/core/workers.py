"""Helper threads that keep working while the interpreter shuts down.

``concurrent.futures`` executors refuse new work once interpreter shutdown has begun (their
``_python_exit`` runs before non-daemon threads are joined). A background export is a non-daemon
thread precisely so that it finishes when training crashes or is interrupted; if its hashing went
through an executor, the first ``submit`` after the crash would raise and the export in flight
would be lost. These workers have no global shutdown flag: they run until their owner closes them.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterable

_STOP = object()


class Workers:
    """``n`` threads running submitted calls; ``submit`` returns a ``concurrent.futures.Future``.
    The threads are daemons: they only ever run work that an owner thread waits for."""

    def __init__(self, n: int = 1, name: str = "sa2va_hooks-worker") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(max(1, n))]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, run on the workers; the first error is raised after all ended."""
        futures = [self.submit(fn, x) for x in items]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    def owns_current_thread(self) -> bool:
        """Whether the caller is one of these threads: work it submits here and waits for could
        wait for itself (every thread busy waiting), so it runs such work inline instead."""
        return threading.current_thread() in self._threads

    def shutdown(self) -> None:
        """Stop the threads once the work queued so far is done (does not wait)."""
        for _ in self._threads:
            self._queue.put(_STOP)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the owner through the future
                future.set_exception(e)
