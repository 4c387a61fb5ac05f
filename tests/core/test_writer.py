"""The streaming safetensors writer against the safetensors library's own reader."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sa2va_hooks.core.shards import TensorSlot, parse_size, plan_shards
from sa2va_hooks.core.writer import write_shard

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _random(dtype: torch.dtype, shape, g) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


def test_streamed_file_reads_back_with_safetensors_for_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.{str(d).removeprefix('torch.')}": _random(d, (3, 5) if i % 2 else (7,), g)
               for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    slots = [TensorSlot(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    size = write_shard(tmp_path / "x.safetensors", slots, lambda s: tensors[s.name])
    assert size == (tmp_path / "x.safetensors").stat().st_size
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for name, want in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_a_tensor_that_does_not_match_its_plan_is_a_bug_report(tmp_path):
    slots = [TensorSlot("w", (2, 2), torch.float32)]
    with pytest.raises(RuntimeError, match=r"tensor 'w' came out as torch.float16\[2, 2\].*converter bug"):
        write_shard(tmp_path / "x.safetensors", slots, lambda s: torch.zeros(2, 2, dtype=torch.float16))


def test_shard_plan_keeps_order_and_gives_an_oversized_tensor_its_own_shard():
    slots = [TensorSlot(f"w{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 100, 10])]
    plan = plan_shards(slots, 80)
    assert [[s.name for s in group] for _, group in plan.files] == [["w0", "w1"], ["w2"], ["w3"]]
    assert [f for f, _ in plan.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan.total_size == 130 * 4
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("five gigs")


def test_staging_pool_hands_out_buffers_by_identity_smallest_that_fits(monkeypatch):
    """Buffers of different sizes in the pool: a request takes the smallest that fits, by identity
    (comparing tensors by value fails between sizes), and the pool stays bounded."""
    import sa2va_hooks.core.host as host
    monkeypatch.setattr(host, "_POOL", [])
    small, large = torch.zeros(100, dtype=torch.uint8), torch.zeros(1000, dtype=torch.uint8)
    host._give_back(small)
    host._give_back(large)
    assert host._take(50) is small
    assert host._take(500) is large
    assert host._POOL == []
    for n in (10, 20, 30):
        host._give_back(torch.zeros(n, dtype=torch.uint8))
    assert sorted(b.numel() for b in host._POOL) == [20, 30]  # bounded: the largest are kept
