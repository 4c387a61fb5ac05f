"""core/workers.py: helper threads whose futures carry results and errors back to the owner."""
from __future__ import annotations

import random
import threading

import pytest

from sa2va_hooks.core.workers import Workers


def test_map_returns_results_in_input_order_computed_on_the_workers():
    items = [random.Random(0).randrange(10 ** 6) for _ in range(50)]
    names: set[str] = set()

    def square(x):
        names.add(threading.current_thread().name)
        return x * x

    with Workers(3, name="t-workers") as w:
        assert w.map(square, items) == [x * x for x in items]
    assert names and all(n.startswith("t-workers-") for n in names)
    assert threading.current_thread().name not in names


def test_map_raises_the_first_error_after_every_call_ended():
    done = []

    def f(x):
        if x in (2, 5):
            raise ValueError(f"bad {x}")
        done.append(x)
        return x

    with Workers(2) as w, pytest.raises(ValueError, match="bad 2"):
        w.map(f, range(8))
    assert sorted(done) == [0, 1, 3, 4, 6, 7]


def test_submit_carries_result_exception_and_arguments():
    with Workers(1) as w:
        assert w.submit(divmod, 17, 5).result(timeout=10) == (3, 2)
        err = w.submit(divmod, 1, 0).exception(timeout=10)
    assert isinstance(err, ZeroDivisionError)


def test_shutdown_finishes_queued_work_and_stops_the_threads():
    w = Workers(2)
    gate = threading.Event()
    futures = [w.submit(gate.wait, 10) for _ in range(4)]
    w.shutdown()
    gate.set()
    assert [f.result(timeout=10) for f in futures] == [True] * 4
    for t in w._threads:
        t.join(timeout=10)
        assert not t.is_alive()


def test_a_cancelled_future_is_skipped():
    w = Workers(1)
    gate = threading.Event()
    first = w.submit(gate.wait, 10)
    ran = []
    second = w.submit(ran.append, 1)
    assert second.cancel()
    gate.set()
    assert first.result(timeout=10) is True
    w.shutdown()
    for t in w._threads:
        t.join(timeout=10)
    assert ran == []
