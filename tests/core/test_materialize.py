"""materialize: the merge of one LoRA layer on a private fp32 stand-in, against W + (alpha/r)·B@A
recomputed by hand and against PEFT's own ``merge_and_unload``; the live layer is left untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from conftest import train_like
from sa2va_hooks.core.materialize import (MergeGroup, NonFiniteError, all_finite, cast_copy, delta_norms,
                                          non_finite_names, same_after_cast)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 12, bias=True)
        self.out = nn.Linear(12, 8)

    def forward(self, x):
        return self.out(self.fc(x))


def _lora(seed: int = 0, r: int = 4, alpha: int = 8):
    torch.manual_seed(seed)
    pm = get_peft_model(_Net(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc"]))
    train_like(pm, seed=seed + 1)  # LoRA B is zero-initialised: give it a real update
    return pm


def _fc(pm):
    return pm.base_model.model.fc


def test_merge_equals_hand_recomputation_and_peft_merge():
    pm = _lora(seed=3, r=4, alpha=8)
    layer = _fc(pm)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    merged = MergeGroup(layer, "fc", ["default"]).take("weight")
    w = layer.base_layer.weight.detach().double()
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    by_hand = w + (8 / 4) * (b @ a)
    assert not torch.equal(by_hand, w)  # the update is visible at all
    torch.testing.assert_close(merged.double(), by_hand, rtol=1e-6, atol=1e-6)
    peft_merged = copy.deepcopy(pm).merge_and_unload().fc.weight.detach()
    torch.testing.assert_close(merged, peft_merged, rtol=0, atol=0)
    assert all(torch.equal(p.detach(), before[n]) for n, p in pm.named_parameters()), "live model changed"
    assert not layer.merged_adapters


def test_merge_group_hands_out_bias_too():
    pm = _lora(seed=5)
    layer = _fc(pm)
    group = MergeGroup(layer, "fc", ["default"])
    weight, bias = group.take("weight"), group.take("bias")
    assert torch.equal(bias, layer.base_layer.bias.detach().float())  # LoRA leaves the bias as it was
    assert weight.shape == (12, 16)


def test_non_finite_adapter_is_refused_before_merging():
    pm = _lora(seed=7)
    layer = _fc(pm)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'fc'"):
        MergeGroup(layer, "fc", ["default"]).take("weight")
    assert non_finite_names([("ok", torch.ones(3)), ("bad", torch.tensor([1.0, float("inf")])),
                             ("ints", torch.arange(3))]) == ["bad"]
    assert all_finite(torch.randn(5)) and not all_finite(torch.tensor([float("-inf")]))


def test_delta_norms_and_casts_against_recomputation():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(7, 9, generator=g)
    merged = base + 0.01 * torch.randn(7, 9, generator=g)
    d, n = delta_norms(merged, base)
    assert d == pytest.approx(float(torch.linalg.vector_norm(merged.double() - base.double())), rel=1e-12)
    assert n == pytest.approx(float(torch.linalg.vector_norm(base.double())), rel=1e-12)
    out = cast_copy(merged, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.data_ptr() != merged.data_ptr()
    assert same_after_cast(out, merged, torch.bfloat16)
    assert not same_after_cast(out, base, torch.bfloat16)
    same = cast_copy(merged, torch.float32)
    assert same.data_ptr() != merged.data_ptr() and torch.equal(same, merged)  # a copy, never a view


def test_one_chunk_fast_paths_equal_fp64_recomputation_bit_for_bit():
    """A tensor of one chunk takes a short path (fewer torch calls in the export's thread); its
    results must be the very bits the chunked loop gives, or a recorded capture statistic would
    differ from a recomputed one. Reference: fp64 arithmetic written here."""
    g = torch.Generator().manual_seed(12)
    base = torch.randn(33, 17, generator=g).to(torch.bfloat16)
    merged = base.float() + 0.003 * torch.randn(33, 17, generator=g)
    b64, m64 = base.double().reshape(-1), merged.double().reshape(-1)
    d64 = m64 - b64
    assert delta_norms(merged, base) == (float(torch.dot(d64, d64).sqrt()), float(torch.dot(b64, b64).sqrt()))
    assert delta_norms(base.float(), base) == (0.0, float(torch.dot(b64, b64).sqrt()))
    assert delta_norms(torch.zeros(0), torch.zeros(0)) == (0.0, 0.0)


def test_one_chunk_fast_paths_agree_with_the_chunked_loop(monkeypatch):
    import sa2va_hooks.core.materialize as mat
    g = torch.Generator().manual_seed(13)
    base = torch.randn(40, 9, generator=g)
    merged = base + 0.01 * torch.randn(40, 9, generator=g)
    one = delta_norms(merged, base)
    monkeypatch.setattr(mat, "CHUNK_ELEMENTS", 7)  # many chunks, a ragged last one
    many = delta_norms(merged, base)
    assert one == pytest.approx(many, rel=1e-13)
    bad = merged.clone()
    bad[39, 8] = float("nan")
    assert not all_finite(bad) and all_finite(merged)
    assert non_finite_names([("a", merged), ("b", bad)]) == ["b"]


def test_non_finite_names_checks_tensors_together_and_names_each():
    # one chunk each, one device: checked in one stacked reduction
    named = [("w", torch.randn(4, 4)), ("nan", torch.tensor([0.0, float("nan")])), ("ints", torch.arange(3)),
             ("none", None), ("empty", torch.zeros(0)), ("scalar_inf", torch.tensor(float("-inf"))),
             ("bf16", torch.randn(3).to(torch.bfloat16))]
    assert non_finite_names(named) == ["nan", "scalar_inf"]
    assert non_finite_names([("ints", torch.arange(3)), ("none", None)]) == []


def test_cast_copy_is_contiguous_and_private_whatever_the_input():
    g = torch.Generator().manual_seed(14)
    t = torch.randn(6, 5, generator=g)
    for src in (t, t.t(), t[:, ::2]):  # contiguous, transposed, strided
        for dtype in (torch.float32, torch.bfloat16):
            out = cast_copy(src, dtype)
            assert out.is_contiguous() and out.dtype == dtype and out.data_ptr() != src.data_ptr()
            assert torch.equal(out, src.to(dtype))
    private = t.t().clone()
    assert cast_copy(t, torch.float32, private=True).data_ptr() == t.data_ptr()  # no second copy
    assert cast_copy(private, torch.float32, private=True).is_contiguous()  # made contiguous all the same


class _Overflowing:
    """A merge group whose merge overflowed fp32 from finite inputs (PEFT's safe merge refuses that
    itself; this is the check behind it): its weight holds an Inf."""

    def __init__(self, layer: nn.Module, value: float) -> None:
        self.layer, self.value = layer, value

    def take(self, pname: str) -> torch.Tensor:
        w = self.layer.weight.detach().clone()
        w[1, 2] = self.value
        return w


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_merged_weight_with_nan_or_inf_is_refused_and_a_finite_one_is_not(value):
    from sa2va_hooks.core.merge import ROLE_LORA, _merged_base_tensor
    layer = nn.Linear(4, 3)
    src = _merged_base_tensor("fc", "weight", layer.weight, _Overflowing(layer, value), ROLE_LORA, ("fc",), layer)
    with pytest.raises(NonFiniteError, match=r"merged 'fc\.weight' has NaN or Inf"):
        src.materialize(torch.bfloat16)
    ok = _merged_base_tensor("fc", "weight", layer.weight, _Overflowing(layer, 3e38), ROLE_LORA, ("fc",), layer)
    out = ok.materialize(torch.float32)  # finite, however large: exported
    assert out.tensor[1, 2].item() == pytest.approx(3e38) and out.delta_rel_norm > 0


def test_same_after_cast_compares_values_in_one_chunk_and_in_many(monkeypatch):
    import sa2va_hooks.core.materialize as mat
    g = torch.Generator().manual_seed(15)
    ref = torch.randn(8, 6, generator=g).to(torch.bfloat16).float()  # exact bf16 values
    for chunk in (1 << 24, 5):  # one chunk, then many with a ragged last one
        monkeypatch.setattr(mat, "CHUNK_ELEMENTS", chunk)
        out = ref.to(torch.bfloat16)
        assert same_after_cast(out, ref, torch.bfloat16)
        # 1e-4 relative, far below half a bf16 step (2^-9): rounds back to the same values
        assert same_after_cast(out, ref * (1 + 1e-4), torch.bfloat16)
        moved = out.clone()
        moved[7, 5] += 1.0
        assert not same_after_cast(moved, ref, torch.bfloat16)
        assert not same_after_cast(out.reshape(6, 8), ref, torch.bfloat16)
