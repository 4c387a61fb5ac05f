"""The rank's error latch: the first error is kept, later ones are dropped, and a failed call
returns ``None`` instead of raising (the caller goes on to the collectives that follow)."""
from __future__ import annotations

import pytest

from sa2va_hooks.core.latch import _Latch


def test_latch_keeps_the_first_error_only():
    latch = _Latch()
    assert not latch.failed and latch.error is None
    first, second = OSError(28, "No space left on device"), ValueError("later")
    latch.set(None)
    assert not latch.failed
    latch.set(first)
    latch.set(second)
    assert latch.failed and latch.error is first


def test_latch_call_returns_the_result_or_keeps_the_error():
    latch = _Latch()
    assert latch.call(lambda a, b: a + b, 1, 2) == 3
    assert latch.call(lambda: 1 / 0) is None
    assert isinstance(latch.error, ZeroDivisionError)
    assert latch.call(lambda: 5) == 5  # a call after a failure still runs: skipping is the caller's choice
    assert isinstance(latch.error, ZeroDivisionError)


def test_latch_call_lets_an_interrupt_through():
    def interrupted():
        raise KeyboardInterrupt
    latch = _Latch()
    with pytest.raises(KeyboardInterrupt):
        latch.call(interrupted)
    assert not latch.failed
