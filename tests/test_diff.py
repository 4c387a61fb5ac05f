"""diff: two snapshots of a tiny random Qwen2 that differ in one tensor; the difference is named and its
relative delta recomputed by hand from safetensors' own reader."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors import safe_open

from conftest import smallest_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.diff import TensorDir, compare_tensors, diff_dirs, plot_rel_delta

CHANGED = "model.layers.0.mlp.up_proj.weight"


def _tiny(seed: int):
    return smallest_qwen2(seed)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    model = _tiny(seed=41)
    export_hf(model, root / "a")
    export_hf(model, root / "same")
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        p = dict(model.named_parameters())[CHANGED]
        p.add_(torch.randn(p.shape, generator=g) * 0.01)
    export_hf(model, root / "b")
    return root


def _read(d, name):
    f = next(p for p in sorted(d.glob("*.safetensors")))
    with safe_open(str(f), framework="pt") as h:
        return h.get_tensor(name)


def test_one_changed_tensor_is_named_with_its_delta(pair):
    diffs = [d for d in diff_dirs(TensorDir(pair / "a"), TensorDir(pair / "b")) if d.status != "identical"]
    assert [d.name for d in diffs] == [CHANGED]
    a, b = _read(pair / "a", CHANGED).double(), _read(pair / "b", CHANGED).double()
    rel = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    assert diffs[0].status == "differs"
    assert diffs[0].rel_norm == pytest.approx(rel, rel=1e-9)
    assert diffs[0].max_abs == pytest.approx(float((a - b).abs().max()), rel=1e-9)
    assert CHANGED in diffs[0].line()


def test_identical_snapshots_have_no_differences(pair):
    diffs = list(diff_dirs(TensorDir(pair / "a"), TensorDir(pair / "same")))
    assert diffs and {d.status for d in diffs} == {"identical"}


def test_compare_tensors_dtype_and_shape():
    x = torch.randn(4, 4)
    assert compare_tensors("x", x, x.to(torch.bfloat16)).status == "dtype"  # equal after the cast to bf16
    assert compare_tensors("x", x, x.to(torch.bfloat16), dtype_counts=False).status == "identical"
    moved = compare_tensors("x", x, (x + 0.5).to(torch.bfloat16))
    assert moved.status == "differs" and moved.dtypes == ("fp32", "bf16")
    assert compare_tensors("x", x, x[:2]).status == "shape"


def test_plot_rel_delta_writes_a_png(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed in this stack: plot_rel_delta needs it")
    out = tmp_path / "delta.png"
    assert plot_rel_delta({"model.layers.0.mlp.up_proj.weight": 0.1, "model.layers.1.self_attn.q_proj.weight": 0.2},
                          out, "t") is True
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_rel_delta({"lm_head.weight": 0.3}, tmp_path / "none.png", "t") is False
    assert not (tmp_path / "none.png").exists()
