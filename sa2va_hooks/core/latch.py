"""The first error of one rank's share of a collective step, kept until the agreement.

Why a latch and not ``raise``: under ZeRO-3 and FSDP every rank must enter the same gathers in
the same order, and every rank must reach the agreement (:func:`~sa2va_hooks.core.dist.agree`)
that follows; a rank that raised out of the loop would leave the others waiting in a collective
until the timeout. So a failing step's error is latched, the later steps skip their work but still
enter every collective, and the agreement reports the first error on every rank.
"""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class _Latch:
    def __init__(self) -> None:
        self.error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def set(self, error: BaseException | None) -> None:
        """Keep ``error`` unless an earlier one is kept already (the first cause is the one to report)."""
        if self.error is None:
            self.error = error

    def call(self, fn: Callable[..., T], *args: object) -> T | None:
        """``fn(*args)``; an :class:`Exception` it raises is kept (``None`` is returned instead).
        A ``KeyboardInterrupt`` or ``SystemExit`` goes on: the process is ending anyway."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - reported collectively, so no rank is left waiting
            self.set(e)
            return None
