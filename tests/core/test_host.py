"""core/host.py: device-to-host copies. On this CPU-only machine: the CPU path of the stager and the
pool's choice of buffers (given plain tensors, since pinned memory needs CUDA)."""
from __future__ import annotations

import pytest
import torch

from sa2va_hooks.core import host


def test_to_host_of_a_cpu_tensor_is_a_contiguous_equal_tensor():
    g = torch.Generator().manual_seed(7)
    t = torch.randn(6, 10, generator=g)
    with host.HostStager() as s:
        same = s.to_host(t)
        assert same.data_ptr() == t.data_ptr()  # already contiguous on the CPU: no copy
        strided = t.t()
        out = s.to_host(strided)
    assert out.is_contiguous() and torch.equal(out, strided) and out.shape == (10, 6)


def test_reserve_allocates_nothing_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path")
    pool: list[torch.Tensor] = []
    monkeypatch.setattr(host, "_POOL", pool)
    host.reserve(1 << 20)
    assert pool == []


def test_pool_hands_out_the_smallest_buffer_that_fits_and_keeps_the_largest(monkeypatch):
    pool: list[torch.Tensor] = []
    monkeypatch.setattr(host, "_POOL", pool)
    for n in (10, 300, 40):
        host._give_back(torch.empty(n, dtype=torch.uint8))
    # at most _POOL_MAX kept, the largest ones, largest first
    assert [b.numel() for b in pool] == sorted([10, 300, 40], reverse=True)[:host._POOL_MAX]
    taken = host._take(20)
    assert taken.numel() == 40 and [b.numel() for b in pool] == [300]
    host._give_back(taken)
    assert host._take(41).numel() == 300


def test_close_gives_the_buffer_back_once(monkeypatch):
    pool: list[torch.Tensor] = []
    monkeypatch.setattr(host, "_POOL", pool)
    buf = torch.empty(64, dtype=torch.uint8)
    monkeypatch.setattr(host, "_take", lambda n: buf)
    s = host.HostStager()
    assert s._buffer(32) is buf
    s.close()
    s.close()
    assert len(pool) == 1 and pool[0] is buf
