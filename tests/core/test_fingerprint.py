"""Fingerprints: what the digest covers, the root digest, the fp64 statistics, the comparison."""
from __future__ import annotations

import torch

import sa2va_hooks.core.fingerprint as fp


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
