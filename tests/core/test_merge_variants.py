"""Every LoRA flavour PEFT offers, and the other PEFT tuners, on tiny real HF models.

Each case builds a model with fresh random weights, gives every trainable tensor non-zero
values (as training would), exports, and then:
- compares every exported tensor with PEFT's own ``merge_and_unload()`` on an fp32 deep copy,
  cast to the export dtype: bit for bit;
- checks the live model is bit-identical afterwards (values and version counters);
- reloads the export with the target HF class (no missing, no unexpected keys) and compares its
  outputs with the live model's forward.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model)
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSpeechSeq2Seq,
                          GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetForImageClassification, WhisperConfig,
                          WhisperForConditionalGeneration)

from conftest import (assert_unchanged, build_or_skip_on_old_peft, config_dtype, snapshot_params,
                      snapshot_tensors, tiny_qwen2, train_like)
from sa2va_hooks import export_hf

G = torch.Generator().manual_seed(7)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen(**kw):
    return tiny_qwen2(**kw), AutoModelForCausalLM, lambda: {"input_ids": torch.randint(0, 96, (2, 9), generator=G)}


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=32)
    return GPT2LMHeadModel(cfg), AutoModelForCausalLM, lambda: {"input_ids": torch.randint(0, 80, (2, 9), generator=G)}


def resnet():
    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4,
                       layer_type="basic")
    return (ResNetForImageClassification(cfg), AutoModelForImageClassification,
            lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=G)})


def whisper():
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=16,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    return (WhisperForConditionalGeneration(cfg), AutoModelForSpeechSeq2Seq,
            lambda: {"input_features": torch.randn(2, 8, 16, generator=G),
                     "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=G)})


def resized_qwen():
    model, cls, inputs = qwen()
    # 4 tokens added for the fine-tune; transformers < 4.46 has no mean_resizing (and never mean-resizes)
    import inspect
    has_mean_resizing = "mean_resizing" in inspect.signature(model.resize_token_embeddings).parameters
    kw = {"mean_resizing": False} if has_mean_resizing else {}
    model.resize_token_embeddings(100, **kw)
    return model, cls, lambda: {"input_ids": torch.randint(0, 100, (2, 9), generator=G)}


def lora(**kw):
    """The config is built when the case runs, so that an older PEFT that lacks an option skips
    that case (with PEFT's own words) instead of failing the whole module's collection."""
    return lambda: LoraConfig(lora_dropout=0.0, **kw)


# case: (model factory, PEFT config or None for full fine-tuning, model dtype, export dtype)
CASES = {
    "linear_fp32_to_bf16": (qwen, lora(r=4, lora_alpha=8, target_modules=ALL_LINEAR), torch.float32, torch.bfloat16),
    "linear_bf16": (qwen, lora(r=8, lora_alpha=16, target_modules="all-linear"), torch.bfloat16, torch.bfloat16),
    "linear_fp16": (qwen, lora(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]), torch.float16, torch.float16),
    "linear_fp32": (qwen, lora(r=4, lora_alpha=32, target_modules=["o_proj"]), torch.float32, torch.float32),
    "rslora": (qwen, lora(r=8, lora_alpha=4, use_rslora=True, target_modules=ALL_LINEAR),
               torch.float32, torch.bfloat16),
    "rank_and_alpha_pattern": (qwen, lora(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                          rank_pattern={"q_proj": 2, "down_proj": 6},
                                          alpha_pattern={"down_proj": 32}), torch.float32, torch.bfloat16),
    "lora_bias": (qwen, lora(r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
                  torch.float32, torch.bfloat16),
    "bias_all": (qwen, lora(r=4, target_modules=["q_proj", "v_proj"], bias="all"), torch.float32, torch.bfloat16),
    "bias_lora_only": (qwen, lora(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only"),
                       torch.float32, torch.bfloat16),
    "embedding": (qwen, lora(r=4, target_modules=["embed_tokens", "q_proj"]), torch.float32, torch.bfloat16),
    "gpt2_conv1d_fan_in_fan_out": (gpt2, lora(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
                                   torch.float32, torch.bfloat16),
    "conv2d": (resnet, lora(r=2, target_modules=["convolution"]), torch.float32, torch.float32),
    "conv1d": (whisper, lora(r=2, target_modules=["conv1", "conv2", "q_proj"]), torch.float32, torch.float32),
    "dora_linear": (qwen, lora(r=4, target_modules=ALL_LINEAR, use_dora=True), torch.float32, torch.bfloat16),
    "dora_embedding": (qwen, lora(r=4, target_modules=["embed_tokens"], use_dora=True), torch.float32, torch.float32),
    "dora_conv2d": (resnet, lora(r=2, target_modules=["convolution"], use_dora=True), torch.float32, torch.float32),
    "dora_gpt2_conv1d": (gpt2, lora(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
                         torch.float32, torch.bfloat16),
    "modules_to_save_resized_vocab": (resized_qwen, lora(r=4, target_modules=ALL_LINEAR,
                                                         modules_to_save=["embed_tokens", "lm_head"]),
                                      torch.float32, torch.bfloat16),
    "tied_embeddings_untied_by_training": (lambda: qwen(tie=True), lora(r=4, target_modules=["q_proj"],
                                                                       modules_to_save=["embed_tokens", "lm_head"]),
                                           torch.float32, torch.bfloat16),
    "projector_and_head_trainable": (resnet, lora(r=2, target_modules=["convolution"], modules_to_save=["classifier"]),
                                     torch.float32, torch.bfloat16),
    "full_finetune_no_lora": (qwen, None, torch.float32, torch.bfloat16),
    "partially_frozen": (qwen, "freeze_layer0", torch.float32, torch.bfloat16),
    "adalora": (qwen, lambda: AdaLoraConfig(init_r=6, target_r=4, target_modules=["q_proj", "v_proj"], total_step=10),
                torch.float32, torch.bfloat16),
    "loha": (qwen, lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
             torch.float32, torch.bfloat16),
    "lokr": (qwen, lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
             torch.float32, torch.bfloat16),
    "ia3": (qwen, lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"]),
            torch.float32, torch.bfloat16),
}
# Where the PeftModel itself cannot run forward, compare with PEFT's own merged fp32 model.
FORWARD_VIA_PEFT_MERGE = {
    "conv1d": "PEFT's LoRA Conv1d wrapper hides .stride, which Whisper's encoder reads in forward",
}
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _build(case: str):
    factory, config, model_dtype, export_dtype = CASES[case]
    model, hf_cls, inputs = factory()
    if config is None:
        live = model
    elif config == "freeze_layer0":
        live = model
        for n, p in live.named_parameters():
            p.requires_grad_(not n.startswith("model.layers.0."))
    else:
        live = build_or_skip_on_old_peft(lambda: get_peft_model(model, config()), case)
    live = live.to(model_dtype)
    train_like(live, scale=0.05)
    return live.eval(), hf_cls, inputs, export_dtype


def _reference(live, dtype) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(live).float()
    ref = ref.merge_and_unload() if hasattr(ref, "merge_and_unload") else ref
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_export_matches_peft_and_reloads(case, tmp_path):
    live, hf_cls, inputs, dtype = _build(case)
    inner = live.get_base_model() if hasattr(live, "get_base_model") else live
    if inner.can_generate():
        inner.generation_config.do_sample, inner.generation_config.top_k = True, 7  # non-default settings
    before = snapshot_params(live)
    manifest = export_hf(live, tmp_path / "out", dtype=dtype)
    assert_unchanged(live, before)

    got = snapshot_tensors(tmp_path / "out")
    ref = _reference(live, dtype)
    assert set(got) <= set(ref) and set(ref) - set(got) == set(manifest.tied), (set(ref) ^ set(got))
    not_exact = [k for k in got if not torch.equal(got[k], ref[k])]
    assert not not_exact, f"differs from PEFT's merge: {not_exact[:5]}"
    assert manifest.training_effect["trained_tensors"] > 0
    assert manifest.training_effect["trained_differ_from_base"] + len(
        manifest.training_effect["trained_unknown_base"]) == manifest.training_effect["trained_tensors"]

    reloaded, info = hf_cls.from_pretrained(tmp_path / "out", torch_dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = inputs()
    with torch.no_grad():
        if case in FORWARD_VIA_PEFT_MERGE:
            want = _logits(copy.deepcopy(live).float().merge_and_unload().eval(), x)
        else:
            want = _logits(live, x)
        have = _logits(reloaded.eval(), x)
    rel = float(torch.linalg.vector_norm(have - want) / torch.linalg.vector_norm(want))
    assert rel < REL_TOL[dtype], rel

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_dtype(cfg) == str(dtype).removeprefix("torch.")
    if reloaded.can_generate():  # the live model's generation settings travel with the weights
        from transformers import GenerationConfig
        assert GenerationConfig.from_pretrained(tmp_path / "out").top_k == 7
    assert cfg["architectures"] == [type(reloaded).__name__]
    emb = [k for k in got if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
    if emb:
        assert cfg["vocab_size"] == got[emb[0]].shape[0]
        # the tie flag matches the tensors: tied exactly when an output weight was left out as tied
        assert cfg.get("tie_word_embeddings", True) == bool(manifest.tied)


def _logits(model, x) -> torch.Tensor:
    return model(**x).logits.float()


def test_untying_is_reported(tmp_path):
    live, *_ = _build("tied_embeddings_untied_by_training")
    m = export_hf(live, tmp_path / "out")
    assert any("tie_word_embeddings set to False" in n for n in m.notes)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_only_active_adapter_is_merged_and_inactive_ones_are_reported(tmp_path):
    pm = get_peft_model(tiny_qwen2(), lora(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])())
    pm.add_adapter("other", lora(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])())
    pm.set_adapter("default")
    train_like(pm)
    with torch.no_grad():  # the inactive adapter has values too, so merging it by mistake would show
        for n, p in pm.named_parameters():
            if ".other." in n:
                p.normal_()
    m = export_hf(pm, tmp_path / "out")
    got = snapshot_tensors(tmp_path / "out")
    ref = _reference(pm, None)
    assert all(torch.equal(got[k], ref[k]) for k in got)
    assert any("adapter 'other' is present on 3 module(s)" in n and "not merged" in n for n in m.notes)


def test_disabled_adapter_is_refused(tmp_path):
    from sa2va_hooks.core.merge import UnsupportedModuleError
    pm = get_peft_model(tiny_qwen2(), lora(r=4, target_modules=["q_proj"])())
    with pm.disable_adapter():
        with pytest.raises(UnsupportedModuleError, match="adapters disabled"):
            export_hf(pm, tmp_path / "out")


def test_vblora_is_merged_by_peft_own_math(tmp_path):
    VBLoRAConfig = build_or_skip_on_old_peft(lambda: __import__("peft").VBLoRAConfig, "VBLoRA")
    pm = get_peft_model(tiny_qwen2(), VBLoRAConfig(r=2, target_modules=["q_proj"], vector_length=8, num_vectors=8))
    train_like(pm)
    m = export_hf(pm, tmp_path / "out")
    got = snapshot_tensors(tmp_path / "out")
    ref = _reference(pm, None)
    assert all(torch.equal(got[k], ref[k]) for k in got)
    assert m.training_effect["trained_differ_from_base"] >= 2


def test_a_merge_peft_refuses_is_an_error_naming_module_and_type(tmp_path, monkeypatch):
    """When PEFT's own merge raises for a layer (e.g. an Arrow router), the export is refused."""
    from peft.tuners.lora.layer import Linear
    from sa2va_hooks.core.merge import UnsupportedModuleError
    pm = get_peft_model(tiny_qwen2(), lora(r=4, target_modules=["q_proj"])())

    def refuse(self, *a, **k):
        raise RuntimeError("Cannot merge an active Arrow router adapter. Remove it first.")

    monkeypatch.setattr(Linear, "merge", refuse)
    with pytest.raises(UnsupportedModuleError, match=r"peft\.tuners\.lora\.layer\.Linear module "
                                                     r"'model\.layers\.0\.self_attn\.q_proj'.*Arrow.*Refusing"):
        export_hf(pm, tmp_path / "out")


def test_prompt_learning_is_refused_not_exported_as_the_base(tmp_path):
    from peft import PromptTuningConfig
    from sa2va_hooks.core.merge import UnsupportedModuleError
    pm = get_peft_model(tiny_qwen2(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(UnsupportedModuleError, match=r"PROMPT_TUNING \(prompt learning\).*Refusing to export"):
        export_hf(pm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
