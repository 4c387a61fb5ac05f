"""``diff`` reports dtype differences (issue 16, item 3): two real exports of one tiny model with fresh
random weights, bf16 and fp32, hold the same values after the cast but are not identical."""
from __future__ import annotations

import re

import pytest

from conftest import tiny_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.cli import main as cli


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff_dtype")
    model = tiny_qwen2(seed=3)
    export_hf(model, root / "bf16", dtype="bf16")
    export_hf(model, root / "bf16_again", dtype="bf16")
    export_hf(model, root / "fp32", dtype=None)  # the model's own fp32
    export_hf(tiny_qwen2(seed=4), root / "other_fp32", dtype=None)
    return root


def _diff(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli(["diff", *args, "--png", ""])
    return rc, capsys.readouterr().out


def test_bf16_and_fp32_exports_of_the_same_weights_differ_in_dtype(exports, capsys):
    rc, out = _diff(capsys, str(exports / "bf16"), str(exports / "fp32"))
    assert rc == 1, out
    assert "RESULT: different" in out and "RESULT: identical" not in out
    names = re.findall(r"^dtype\s+(\S+): dtype: A bf16, B fp32 \(values equal after the cast to the narrower dtype\)$",
                       out, re.M)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert not re.search(r"^(differs|identical)\s", out, re.M)  # every tensor differs in dtype only
    n = len(names)
    assert f"A and B differ in {n} of {n} common tensors" in out
    assert f"A and B differ in dtype in {n} tensors (A bf16, B fp32: {n}), {n} of them only in dtype" in out


def test_different_values_and_dtypes_are_both_named(exports, capsys):
    rc, out = _diff(capsys, str(exports / "bf16"), str(exports / "other_fp32"))
    assert rc == 1
    assert re.search(r"^differs\s+model\.embed_tokens\.weight: dtype: A bf16, B fp32; max \|a-b\| ", out, re.M), out
    # LayerNorm weights start at ones in both models: equal values, different dtype
    assert re.search(r"^dtype\s+model\.norm\.weight: dtype: A bf16, B fp32 ", out, re.M), out


def test_identical_snapshots_are_still_identical(exports, capsys):
    rc, out = _diff(capsys, str(exports / "bf16"), str(exports / "bf16_again"))
    assert rc == 0, out
    assert out.rstrip().endswith("RESULT: identical") and "dtype" not in out


def test_against_a_base_an_unchanged_bf16_export_of_an_fp32_base_still_counts_as_the_base(exports, capsys):
    """Decision 17 stays: vs --base, fp32 and bf16 equal after the cast carry no training."""
    rc, out = _diff(capsys, str(exports / "bf16"), str(exports / "bf16_again"), "--base", str(exports / "fp32"))
    assert rc == 0, out
    assert "A carries training in 0 tensors vs BASE (0 not in BASE); B in 0 (0 not in BASE)" in out
