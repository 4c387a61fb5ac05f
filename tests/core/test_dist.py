"""core/dist.py without a process group: ``RankGroup`` in one process, and ``StoreGroup`` with its
ranks as threads of this process over one in-memory ``torch.distributed.HashStore`` (what a TCPStore
does across processes). Timeouts are short, and each wait is for a state, not for a fixed time."""
from __future__ import annotations

import random
import threading

import pytest
import torch.distributed as dist

from sa2va_hooks.core.dist import (RankFailedError, RankGroup, RankTimeoutError, StoreGroup, agree, describe)
from sa2va_hooks.core.errors import BadValueError


def _run_ranks(world: int, fn, timeout_s: float = 30.0, store=None):
    """fn(group) on ``world`` threads, one per rank; returns each rank's result or exception."""
    store = store if store is not None else dist.HashStore()
    out: list = [None] * world

    def one(rank):
        try:
            out[rank] = fn(StoreGroup(rank, world, timeout_s, store=store))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out[rank] = e
    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_one_process_group_needs_no_communication():
    g = RankGroup.current()
    assert (g.rank, g.world, g.is_main) == (0, 1, True)
    obj = {"x": random.random()}
    assert g.all_gather(obj) == [obj] and g.broadcast(obj) is obj and g.session("a") is g
    assert RankGroup.background() == RankGroup(0, 1)


@pytest.mark.parametrize("world", [2, 3])
def test_store_all_gather_and_broadcast_in_rank_order(world):
    values = [random.Random(r).random() for r in range(world)]

    def fn(g):
        s = g.session("export")
        gathered = s.all_gather((g.rank, values[g.rank]))
        return gathered, s.broadcast(f"from {g.rank}", src=world - 1), s.all_gather(g.rank * 10)
    for got in _run_ranks(world, fn):
        assert not isinstance(got, BaseException), got
        assert got[0] == [(r, values[r]) for r in range(world)]
        assert got[1] == f"from {world - 1}" and got[2] == [r * 10 for r in range(world)]


def test_a_rank_that_never_answers_is_named_and_the_others_stop():
    def fn(g):
        if g.rank == 2:
            return "absent"
        return g.session("s").all_gather(g.rank)
    got = _run_ranks(3, fn, timeout_s=0.5)
    assert got[2] == "absent"
    errors = [e for e in got[:2] if isinstance(e, RankFailedError)]
    assert len(errors) == 2
    # the first to time out names rank 2; the other either times out too or sees that one gave up
    timeouts = [e for e in errors if isinstance(e, RankTimeoutError)]
    assert timeouts and all(e.missing == [2] and "rank(s) 2 did not answer within 0.5 s" in str(e) for e in timeouts)
    assert all("rank(s) 2 did not answer" in str(e) for e in errors)


def test_abandon_is_seen_at_the_next_wait_and_before_publishing():
    store = dist.HashStore()
    a, b = StoreGroup(0, 2, 5.0, store=store).session("x"), StoreGroup(1, 2, 5.0, store=store).session("x")
    a.raise_if_abandoned()
    b.abandon("disk full")
    with pytest.raises(RankFailedError, match=r"another rank gave up on this export \(rank 1: disk full\)"):
        a.raise_if_abandoned()
    with pytest.raises(RankFailedError, match="rank 1: disk full"):
        a.all_gather(1)


def test_sessions_have_their_own_keys():
    store = dist.HashStore()
    first = _run_ranks(2, lambda g: [g.session("a").all_gather(g.rank), g.session("b").all_gather(-g.rank)],
                       store=store)
    assert first == [[[0, 1], [0, -1]], [[0, 1], [0, -1]]]


def test_the_last_sessions_final_word_outlives_rank_0_starting_the_next():
    """Rank 0's last step is one-way: it may end a session and start the next export's while
    rank 1 has not read its final word yet. Starting a session must not delete that word."""
    store = dist.HashStore()
    g0, g1 = StoreGroup(0, 2, 0.5, store=store), StoreGroup(1, 2, 0.5, store=store)
    s0, s1 = g0.session("a"), g1.session("a")
    s0.broadcast("published")
    g0.session("b")  # rank 0's next export starts before rank 1 reads
    assert s1.broadcast(None) == "published"
    g0.session("c")  # two sessions on: rank 1 has necessarily left "a" (it ended before its "b" began)
    assert not store.check([f"{s0.prefix}/1/0"])


def test_timeout_must_be_positive():
    with pytest.raises(BadValueError, match="must be positive seconds, got 0"):
        StoreGroup(0, 1, 0, store=dist.HashStore())


def test_agree_raises_the_same_error_naming_every_failed_rank():
    with pytest.raises(KeyError):
        agree(RankGroup(0, 1), KeyError("own"), "writing")  # one process: its own exception
    agree(RankGroup(0, 1), None, "writing")

    def fn(g):
        agree(g, ValueError("bad shard") if g.rank == 1 else "disk full" if g.rank == 2 else None, "writing")
    got = _run_ranks(3, fn)
    assert all(isinstance(e, RankFailedError) for e in got)
    assert {str(e) for e in got} == {"writing failed on 2 rank(s): rank 1: ValueError: bad shard; rank 2: disk full"}
    assert describe(OSError("x")) == "OSError: x"
