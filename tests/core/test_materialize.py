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
