"""The queue between the training thread (gathering ZeRO-3 / FSDP tensors) and the export's
writer thread: bounded bytes, and a training thread never held longer than the timeout by a
writer that takes nothing."""
from __future__ import annotations

import threading

from sa2va_hooks.core.background import _ByteQueue


def test_put_blocks_while_the_budget_is_full_and_resumes_when_the_writer_takes():
    q = _ByteQueue(budget=10)
    q.put("a", 8)
    done = threading.Event()
    t = threading.Thread(target=lambda: (q.put("b", 8), done.set()))
    t.start()
    assert not done.wait(0.05) and q.items == ["a"]  # held: 8 + 8 > 10
    item = next(iter(q))
    q.release(8)
    t.join()
    assert item == "a" and q.items == ["b"] and q.error is None


def test_a_writer_that_takes_nothing_holds_training_at_most_timeout_s():
    q = _ByteQueue(budget=10, timeout_s=0.2)
    q.put("a", 8)
    q.put("b", 8)  # the writer never takes "a": this returns after the timeout instead of never
    assert isinstance(q.error, TimeoutError) and "took nothing for 0.2 s" in str(q.error)
    assert q.closed and q.abandoned and q.items == []
    q.put("c", 1)  # later puts return at once
    assert list(q) == []  # and a writer that wakes up finds the queue closed
