"""QLoRA: a bitsandbytes 4-bit (nf4) or 8-bit base under LoRA, on the CPU (bitsandbytes 0.49.2
quantizes and dequantizes on the CPU; transformers 4.48's from_pretrained path for bnb does not
run on a CPU here, so the tiny model's linear layers are quantized by hand, as
replace_with_bnb_linear would)."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import assert_unchanged, config_dtype, snapshot_params, snapshot_tensors, tiny_qwen2, train_like
from sa2va_hooks import export_hf
from sa2va_hooks.core.merge import dequantized_weight

bnb = pytest.importorskip("bitsandbytes")
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def _bnb_quantizes_on_the_cpu():
    """bitsandbytes < 0.46 quantizes only on CUDA, and an older PEFT's ``dequantize_bnb_weight`` (0.11.1,
    the `legacy` stack) moves a CPU weight to CUDA to dequantize it: without CUDA these tests skip with
    the library's own words; on the others they must run."""
    probe = nn.Module()
    probe.q_proj = nn.Linear(16, 16)
    try:
        for bits in (4, 8):
            dequantized_weight(_quantize(probe, bits).q_proj)
            probe.q_proj = nn.Linear(16, 16)
    except (AssertionError, RuntimeError, NotImplementedError) as e:
        import peft
        from packaging.version import Version

        from conftest import NEWEST_TESTED_PEFT
        if Version(bnb.__version__) < Version("0.46"):
            pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize on the CPU: {type(e).__name__}: {e}")
        if Version(peft.__version__) < Version(NEWEST_TESTED_PEFT) and not torch.cuda.is_available():
            pytest.skip(f"peft {peft.__version__}'s dequantize_bnb_weight needs CUDA (it moves CPU weights "
                        f"there): {type(e).__name__}: {e}")
        raise


def _quantize(model: nn.Module, bits: int) -> nn.Module:
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and cname in QUANTIZED:
                if bits == 4:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                else:
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=0.0)
                    q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False,
                                                 has_fp16_weights=False)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(mod, cname, q.to("cpu"))
    return model


def _fp32_twin(qmodel: nn.Module, pm) -> nn.Module:
    """The same model in fp32 with the dequantized base values, and the same LoRA weights."""
    twin = tiny_qwen2()
    qmods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, mod in twin.named_modules():
            base = qmods.get(name)
            base = base.get_base_layer() if hasattr(base, "get_base_layer") else base
            if isinstance(mod, nn.Linear) and base is not None and hasattr(base, "weight") and \
                    type(base.weight).__name__ in ("Params4bit", "Int8Params"):
                mod.weight.copy_(dequantized_weight(base))
    tpm = get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    lora = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    missing, unexpected = tpm.load_state_dict(lora, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    return tpm


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_export_dequantizes_and_merges_like_peft_in_fp32(bits, tmp_path):
    qmodel = _quantize(tiny_qwen2(), bits)
    pm = get_peft_model(qmodel, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    # PEFT wraps the quantized layer (its bnb-specific class only where bnb's CUDA path is on)
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight).__name__ in (
        "Params4bit", "Int8Params")
    train_like(pm)
    before = snapshot_params(pm)
    m = export_hf(pm, tmp_path / "out", dtype="bf16")
    assert_unchanged(pm, before)
    assert any(n.startswith("base dequantized: 14 quantized (bitsandbytes) module(s)") for n in m.notes)

    twin = _fp32_twin(qmodel, pm)
    ref = {k: v.to(torch.bfloat16) for k, v in twin.merge_and_unload().state_dict().items()}
    got = snapshot_tensors(tmp_path / "out")
    assert set(got) == set(ref)
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    k = "model.layers.0.self_attn.q_proj.weight"
    assert got[k].shape == (32, 32) and not torch.equal(got[k], dequantized_weight(
        qmodel.model.layers[0].self_attn.q_proj.base_layer).to(torch.bfloat16))

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32,
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert config_dtype(json.loads((tmp_path / "out" / "config.json").read_text())) == "bfloat16"
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, have = pm.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits
    assert float(torch.linalg.vector_norm(have - want) / torch.linalg.vector_norm(want)) < 2e-2


def test_a_4bit_layer_repacked_for_the_cpu_kernel_is_refused_before_anything_is_written(tmp_path):
    """bitsandbytes' eval-mode CPU path (AVX512-BF16) repacks a Linear4bit in place, as below (its own
    function, the call its forward makes). Dequantized as a plain 4-bit weight those bytes are not the
    base: the export must stop, naming the layer, and write nothing."""
    functional = pytest.importorskip("bitsandbytes.functional")
    pack = getattr(functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU repacking (added in 0.48)")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sa2va_hooks.core.merge import UnsupportedModuleError
    torch.manual_seed(0)
    qmodel = _quantize(Qwen2ForCausalLM(Qwen2Config(  # 128 wide: the packing needs 32-row blocks of 64-wide scales
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=64)), 4)
    pm = get_peft_model(qmodel, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]))
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    before = dequantized_weight(layer).clone()
    layer.weight.data, layer.weight.quant_state = pack(layer.weight.data, layer.weight.quant_state)
    with pytest.raises(UnsupportedModuleError, match=r"1 4-bit layer\(s\) were repacked in place by bitsandbytes for "
                                                     r"its CPU kernel .*: base_model\.model\.model\.layers\.0\.mlp\."
                                                     r"up_proj\. .* nothing is exported"):
        export_hf(pm, tmp_path / "out", dtype="fp32")
    assert not list(tmp_path.iterdir())
    # why: the repacked bytes, read as a plain 4-bit weight, are not the base values
    plain = functional.dequantize_4bit(layer.weight.data.reshape(-1, 1), quant_state=functional.QuantState(
        absmax=layer.weight.quant_state.absmax.T.reshape(-1).float(), shape=before.shape, blocksize=64,
        quant_type="nf4", dtype=torch.float32, code=layer.weight.quant_state.code)).float()
    assert not torch.allclose(plain, before, atol=1e-2)
