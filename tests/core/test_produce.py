"""Non-finite values never reach a snapshot: every exported tensor is checked after the cast,
and the error says whether memory or the cast produced them. Nothing is published."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_qwen2, train_like
from sa2va_hooks import NonFiniteError, export_hf


def _peft(modules_to_save=None):
    pm = get_peft_model(tiny_qwen2(seed=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       modules_to_save=modules_to_save))
    train_like(pm, seed=3)
    return pm


def _refused(model, tmp_path, dtype, match):
    with pytest.raises(NonFiniteError, match=match) as err:
        export_hf(model, tmp_path / "out", dtype=dtype)
    assert list(tmp_path.iterdir()) == [], "nothing published, no staging left"
    return str(err.value)


def test_inf_after_the_fp16_cast_is_refused_as_an_overflow(tmp_path):
    model = tiny_qwen2()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e6  # finite in fp32, inf in fp16
    msg = _refused(model, tmp_path, "fp16", r"model\.layers\.1\.mlp\.down_proj\.weight")
    assert "cast to float16 overflowed" in msg
    export_hf(model, tmp_path / "bf16", dtype="bf16")  # fits bf16: exported


def test_nan_in_a_modules_to_save_copy_is_refused(tmp_path):
    pm = _peft(modules_to_save=["lm_head"])
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight[3, 3] = float("nan")
    msg = _refused(pm, tmp_path, "bf16", r"lm_head\.weight")
    assert "in memory" in msg and "modules_to_save" in msg


def test_inf_in_a_directly_trained_parameter_is_refused(tmp_path):
    model = tiny_qwen2()
    norm = model.model.norm.weight
    norm.requires_grad_(True)
    with torch.no_grad():
        norm[0] = float("inf")
    assert "in memory" in _refused(model, tmp_path, None, r"model\.norm\.weight")


def test_nan_in_a_frozen_tensor_is_refused(tmp_path):
    pm = _peft()
    with torch.no_grad():
        pm.base_model.model.model.layers[0].mlp.up_proj.weight[1, 2] = float("nan")
    assert "frozen" in _refused(pm, tmp_path, "bf16", r"layers\.0\.mlp\.up_proj\.weight")


def test_nan_in_a_lora_adapter_is_a_nonfinite_error_not_an_unsupported_module(tmp_path):
    pm = _peft()
    with torch.no_grad():
        pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("nan")
    msg = _refused(pm, tmp_path, "bf16", r"layers\.0\.self_attn\.q_proj")
    assert "lora_B" in msg and "training diverged" in msg
