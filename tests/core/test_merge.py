"""The out-of-place merge equals PEFT's merge_and_unload (fp32 on a copy, then cast), bit for bit,
and leaves the live model untouched."""
from __future__ import annotations

import glob

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from conftest import (assert_unchanged, build_or_skip_on_old_peft, peft_reference, snapshot_params, tiny_qwen2,
                      train_like)
from sa2va_hooks import export_hf
from sa2va_hooks.core.merge import UnsupportedModuleError

CASES = {
    # name: (model dtype, export dtype, LoraConfig kwargs)
    "fp32_model_bf16_export": (torch.float32, torch.bfloat16, dict(r=4, lora_alpha=8,
                                                                   target_modules=["q_proj", "v_proj", "down_proj"])),
    "bf16_model_bf16_export": (torch.bfloat16, torch.bfloat16, dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "fp32_model_fp32_export": (torch.float32, torch.float32, dict(r=4, lora_alpha=32, target_modules=["o_proj"])),
    "fp16_model_fp16_export_modules_to_save": (
        torch.float16, torch.float16,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], modules_to_save=["embed_tokens", "lm_head"])),
}


def _load_dir(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_bitwise(case, tmp_path):
    model_dtype, export_dtype, lora = CASES[case]
    pm = get_peft_model(tiny_qwen2().to(model_dtype), LoraConfig(lora_dropout=0.0, **lora))
    train_like(pm)
    before = snapshot_params(pm)
    export_hf(pm, tmp_path / "out", dtype=export_dtype, max_shard_size="40KB")
    assert_unchanged(pm, before)
    ref = peft_reference(pm, export_dtype)
    got = _load_dir(tmp_path / "out")
    assert set(got) == set(ref)
    mismatched = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not mismatched, f"differs from PEFT's merge: {mismatched}"
    # the LoRA targets really moved: otherwise the comparison above proves nothing
    base = tiny_qwen2().state_dict()
    moved = [k for k in ref if "proj" in k and not torch.equal(ref[k], base[k].to(export_dtype))]
    assert moved


def test_export_of_merged_adapter_is_not_double_counted(tmp_path):
    """A layer whose adapter the user already merged in place must not get the delta twice."""
    pm = get_peft_model(tiny_qwen2(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    train_like(pm)
    ref = peft_reference(pm, None)
    pm.merge_adapter()
    export_hf(pm, tmp_path / "out")
    got = _load_dir(tmp_path / "out")
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


def test_trainable_tokens_are_merged_or_refused_never_dropped(tmp_path):
    """PEFT's trainable_token_indices: either exported exactly as PEFT merges it, or refused."""
    pm = build_or_skip_on_old_peft(
        lambda: get_peft_model(tiny_qwen2(), LoraConfig(r=4, target_modules=["q_proj"],
                                                        trainable_token_indices={"embed_tokens": [3, 5]})),
        "trainable_token_indices")
    train_like(pm)
    try:
        export_hf(pm, tmp_path / "out")
    except UnsupportedModuleError as e:
        assert "embed_tokens" in str(e) and "Refusing" in str(e)
        assert not (tmp_path / "out").exists()
    else:
        ref = peft_reference(pm, None)
        got = _load_dir(tmp_path / "out")
        assert [k for k in got if not torch.equal(got[k], ref[k])] == []
        assert not torch.equal(got["model.embed_tokens.weight"], tiny_qwen2().state_dict()["model.embed_tokens.weight"])
