"""Fingerprints: what the digest covers, the root digest, the fp64 statistics, the comparison."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import xxhash

import sa2va_hooks.core.fingerprint as fp
from sa2va_hooks.core.workers import Workers


def test_digest_changes_with_name_dtype_shape_and_any_byte():
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    base = fp.fingerprint_tensor("w", t).digest
    flipped = t.clone()
    flipped.view(torch.int32)[2, 3] ^= 1  # one bit of one element
    variants = [fp.fingerprint_tensor("w2", t), fp.fingerprint_tensor("w", t.to(torch.float64)),
                fp.fingerprint_tensor("w", t.reshape(6, 4)), fp.fingerprint_tensor("w", flipped)]
    assert all(v.digest != base for v in variants)
    assert fp.fingerprint_tensor("w", t.clone()).digest == base


def test_root_digest_ignores_order_but_not_content():
    g = torch.Generator().manual_seed(1)
    fps = {n: fp.fingerprint_tensor(n, torch.randn(3, generator=g)) for n in "abc"}
    assert fp.root_digest(fps) == fp.root_digest(dict(reversed(list(fps.items()))))
    assert fp.root_digest(fps) == fp.root_digest({n: f.digest for n, f in fps.items()})
    assert fp.root_digest(fps) != fp.root_digest({k: v for k, v in fps.items() if k != "b"})


def test_chunked_fp64_statistics_equal_a_direct_fp64_computation(monkeypatch):
    monkeypatch.setattr(fp, "CHUNK_ELEMENTS", 7)  # many chunks, a ragged last one
    g = torch.Generator().manual_seed(2)
    for t in [torch.randn(5, 9, generator=g), torch.randn(31, generator=g).to(torch.bfloat16), torch.tensor(2.5),
              torch.zeros(0, 3), torch.randint(-9, 9, (11,), generator=g), torch.rand(13, generator=g) > 0.5]:
        norm, total = fp.tensor_stats(t)
        t64 = t.to(torch.float64)
        assert abs(norm - float(torch.linalg.vector_norm(t64))) <= 1e-9 * max(1.0, norm)
        assert abs(total - float(t64.sum())) <= 1e-9 * max(1.0, abs(total))


def test_comparison_lists_missing_extra_and_mismatched_tensors():
    a = {"x": "1" * 32, "y": "2" * 32, "z": "3" * 32}
    b = {"x": "1" * 32, "y": "f" * 32, "w": "4" * 32}
    lines = [str(m) for m in fp.compare_fingerprints(a, b)]
    assert lines == ["missing z", "extra w", f"mismatch y: expected {'2' * 32}, got {'f' * 32}"]


# -- digest v2 (chunked) against references written here with xxhash directly -------------------------
V1 = "xxh3_128(name,dtype,shape,bytes);v1"


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""


def _header(name: str, t: torch.Tensor) -> bytes:
    return json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()


def _v1_reference(name: str, t: torch.Tensor) -> str:
    return xxhash.xxh3_128(_header(name, t) + _raw(t)).hexdigest()


def _v2_reference(name: str, t: torch.Tensor, chunk: int) -> str:
    raw = _raw(t)
    h = xxhash.xxh3_128(_header(name, t))
    for i in range(0, len(raw), chunk):
        h.update(xxhash.xxh3_128_digest(raw[i:i + chunk]))
    return h.hexdigest()


CHUNK = 64
G = torch.Generator().manual_seed(5)
SIZED = {  # bytes relative to one 64-byte chunk
    "empty": torch.zeros(0, 3),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
    "smaller": torch.randn(5, generator=G),  # 20 bytes
    "one chunk exactly": torch.randn(4, 4, generator=G),  # 64 bytes
    "two chunks exactly": torch.randn(64, generator=G).to(torch.bfloat16).reshape(8, 8),  # 128 bytes
    "larger, ragged tail": torch.randn(7, 11, generator=G),  # 308 bytes: 4 chunks and 52
    "bool": torch.rand(200, generator=G) > 0.5,
    "int8 non-contiguous": torch.randint(-9, 9, (20, 9), generator=G, dtype=torch.int8).t(),
}


@pytest.mark.parametrize("case", sorted(SIZED))
def test_v2_digest_equals_an_independent_recomputation(case):
    t = SIZED[case]
    assert fp.digest_tensor("m.w", t, chunk_bytes=CHUNK) == _v2_reference("m.w", t, CHUNK)
    assert fp.digest_tensor_as(fp.digest_algorithm(CHUNK), "m.w", t) == _v2_reference("m.w", t, CHUNK)
    assert fp.digest_tensor_v1("m.w", t) == fp.digest_tensor_as(V1, "m.w", t) == _v1_reference("m.w", t)


def test_v2_digest_at_the_real_chunk_size_equals_the_reference():
    assert fp.CHUNK_BYTES == 16 << 20
    assert fp.DIGEST_ALGORITHM == "xxh3_128(name,dtype,shape,xxh3_128 per 16MiB chunk);v2"
    t = torch.randint(0, 256, (2 * fp.CHUNK_BYTES + 4099,), generator=G, dtype=torch.uint8)
    raw = t.numpy().tobytes()
    h = xxhash.xxh3_128(_header("emb", t))
    for i in range(0, len(raw), 16 << 20):
        h.update(xxhash.xxh3_128(raw[i:i + (16 << 20)]).digest())
    assert fp.digest_tensor("emb", t) == h.hexdigest()
    assert fp.fingerprint_tensor("emb", t).algorithm == fp.DIGEST_ALGORITHM
    assert fp.digest_tensor("emb", t) != _v1_reference("emb", t)  # the versions never collide by accident


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_parallel_digest_equals_serial(threads):
    t = torch.randn(1000, generator=G)  # 4000 bytes: 62 chunks of 64 and a tail of 32
    serial = fp.digest_tensor("w", t, chunk_bytes=CHUNK, workers=None) if threads == 1 else None
    with Workers(threads) as pool:
        got = fp.digest_tensor("w", t, pool, chunk_bytes=CHUNK)
        # called from one of the pool's own threads: hashed inline, never waiting for itself
        inside = pool.submit(fp.digest_tensor, "w", t, pool).result(timeout=30)
    assert got == _v2_reference("w", t, CHUNK)
    assert inside == fp.digest_tensor("w", t)
    assert serial in (None, got)


def test_default_pool_is_shared_and_bounded():
    pool = fp.default_digest_workers()
    assert pool is fp.default_digest_workers()
    assert len(pool._threads) == min(8, os.cpu_count() or 1)


def test_digest_from_chunks_assembles_ranges_held_elsewhere():
    """What a ZeRO-3 caller does: each rank hashes the whole chunks in its element range, the boundary
    chunk is hashed from bytes put together from two ranks; the result equals the whole tensor's."""
    t = torch.randn(100, generator=G)  # 400 bytes, chunks of 64
    raw = t.numpy().tobytes()
    rank0, rank1 = raw[:150], raw[150:]  # a split inside the third chunk
    chunks = [fp.chunk_digest(rank0[0:64]), fp.chunk_digest(rank0[64:128]), fp.chunk_digest(rank0[128:] + rank1[:42])]
    chunks += [fp.chunk_digest(rank1[i:i + 64]) for i in range(42, len(rank1), 64)]
    assert fp.digest_from_chunks("w", t.dtype, t.shape, chunks) == fp.digest_tensor("w", t, chunk_bytes=64)
    assert fp.digest_from_chunks("w", "float32", [100], chunks) == _v2_reference("w", t, 64)
    with pytest.raises(ValueError, match="chunk digest of w is 3 bytes, expected 16"):
        fp.digest_from_chunks("w", "float32", [100], [b"abc"])


def test_algorithm_string_records_the_chunk_size_and_unknown_ones_are_refused():
    assert fp.digest_algorithm(64) == "xxh3_128(name,dtype,shape,xxh3_128 per 64B chunk);v2"
    assert fp.digest_algorithm(4 << 10) == "xxh3_128(name,dtype,shape,xxh3_128 per 4KiB chunk);v2"
    for n in (64, 4 << 10, 16 << 20, 1 << 30, 1000):
        assert fp.chunk_bytes_of(fp.digest_algorithm(n)) == n
    assert fp.chunk_bytes_of(V1) is None
    with pytest.raises(fp.UnknownDigestAlgorithmError, match="unknown digest algorithm 'sha256;v3'.*upgrade"):
        fp.digest_tensor_as("sha256;v3", "w", torch.zeros(1))


def test_fingerprints_of_different_versions_are_incomparable_never_a_mismatch():
    t = torch.randn(3, generator=G)
    old = fp.Fingerprint.from_json({**fp.fingerprint_tensor("w", t).to_json(), "algorithm": V1,
                                    "digest": _v1_reference("w", t)})
    new = fp.fingerprint_tensor("w", t)
    assert [m.kind for m in fp.compare_fingerprints({"w": old}, {"w": new})] == ["incomparable"]
    assert "recompute it with the recorded algorithm" in str(fp.compare_fingerprints({"w": old}, {"w": new})[0])
    assert fp.compare_fingerprints({"w": old}, {"w": fp.fingerprint_tensor("w", t, algorithm=V1)}) == []
    legacy = {k: v for k, v in old.to_json().items() if k != "algorithm"}  # a record that names none is v1
    assert fp.Fingerprint.from_json(legacy).algorithm == V1


def test_one_chunk_statistics_are_the_fp64_dot_and_sum_bit_for_bit():
    """The one-chunk path must give the chunked loop's very bits (a statistic recorded at a capture is
    compared exactly with a recomputation). Reference: fp64 arithmetic here, the loop's ``0 + x``
    included (it turns a -0.0 sum into +0.0)."""
    g = torch.Generator().manual_seed(4)
    cases = [torch.randn(5, 9, generator=g), torch.randn(31, generator=g).to(torch.bfloat16), torch.tensor(2.5),
             torch.zeros(0, 3), torch.randint(-9, 9, (11,), generator=g), torch.tensor([-0.0, -0.0]),
             torch.randn(4, generator=g, dtype=torch.complex64)]
    for t in cases:
        squares, total = fp.tensor_stats_pending(t)
        v = (t.abs() if t.is_complex() else t).to(torch.float64).reshape(-1)
        want_sq, want_sum = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        want_sq += torch.dot(v, v)
        want_sum += v.sum()
        assert squares.item() == want_sq.item() and total.item() == want_sum.item(), t
        assert math.copysign(1.0, total.item()) == math.copysign(1.0, want_sum.item()), t
    assert math.copysign(1.0, fp.tensor_stats_pending(torch.tensor([-0.0, -0.0]))[1].item()) == 1.0
    squares, total = fp.tensor_stats_pending(torch.tensor([True, False, True]))
    assert (squares.item(), total.item()) == (2.0, 2.0)
