"""Each model family's converter: a real model of the family, exported, and loaded by the HF class
it targets with no missing and no unexpected keys; tensors compared with PEFT's own merge."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig

from conftest import (assert_unchanged, snapshot_params, snapshot_tensors, train_like, transformers_class_or_skip,
                      xtuner_or_skip)
from sa2va_hooks import export_hf
from sa2va_hooks.compat import apply_torch_cpu_bf16_shim
from sa2va_hooks.converters.base import ConversionError

G = torch.Generator().manual_seed(11)


def _xtuner_llava(tmp_path, with_image_token=True):
    xtuner_or_skip("Qwen2ForCausalLM")
    apply_torch_cpu_bf16_shim()
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model import LLaVAModel
    from sa2va_demo.families import make_clip_dir, make_llm_dir
    llm_dir = make_llm_dir(tmp_path / "llm", extra_tokens=("<image>",) if with_image_token else ())
    clip_dir = make_clip_dir(tmp_path / "clip")
    from mmengine.config import ConfigDict
    model = LLaVAModel(
        llm=ConfigDict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(llm_dir),
                 torch_dtype=torch.float32),
        visual_encoder=dict(type=CLIPVisionModel.from_pretrained, pretrained_model_name_or_path=str(clip_dir)),
        freeze_llm=True, freeze_visual_encoder=True, use_activation_checkpointing=False,
        llm_lora=dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "v_proj", "down_proj"]),
        visual_encoder_lora=dict(type=LoraConfig, r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj"]))
    train_like(model)
    return model.eval(), llm_dir


def test_llava_export_loads_as_llava_for_conditional_generation(tmp_path):
    from transformers import LlavaForConditionalGeneration
    model, llm_dir = _xtuner_llava(tmp_path)
    before = snapshot_params(model)
    m = export_hf(model, tmp_path / "out", converter=dict(type="auto", tokenizer=str(llm_dir)))
    assert_unchanged(model, before)
    assert m.converter == "llava"

    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["image_token_index"] == len(json.loads((tmp_path / "out" / "tokenizer.json").read_text())
                                           ["model"]["vocab"])  # the added <image> token
    assert cfg["text_config"]["vocab_size"] == hf.language_model.get_input_embeddings().weight.shape[0]

    # every exported LLM and vision tensor equals PEFT's own merge of the same modules
    got = snapshot_tensors(tmp_path / "out")
    llm_ref = copy.deepcopy(model.llm).merge_and_unload().state_dict()
    vis_ref = copy.deepcopy(model.visual_encoder).merge_and_unload().state_dict()
    assert all(torch.equal(got["language_model." + k], v) for k, v in llm_ref.items())
    assert all(torch.equal(got["vision_tower." + k], v) for k, v in vis_ref.items())
    assert torch.equal(got["multi_modal_projector.linear_2.weight"], model.projector.model[2].weight)

    ids = torch.randint(4, 60, (2, 7), generator=G)
    pix = torch.randn(2, 3, 16, 16, generator=G)
    with torch.no_grad():
        want_text = model.llm(input_ids=ids).logits
        text_out = hf.language_model(input_ids=ids)  # transformers >= 4.52: the text model without its head
        have_text = text_out.logits if hasattr(text_out, "logits") else hf.lm_head(text_out.last_hidden_state)
        hidden = model.visual_encoder(pix, output_hidden_states=True).hidden_states[model.visual_select_layer][:, 1:]
        want_img = model.projector(hidden)
        have_img = hf.get_image_features(pixel_values=pix, vision_feature_layer=cfg["vision_feature_layer"],
                                         vision_feature_select_strategy="default")
    torch.testing.assert_close(have_text, want_text, atol=1e-5, rtol=1e-5)
    if isinstance(have_img, (list, tuple)):  # transformers >= 4.57 returns one tensor per image
        have_img = torch.stack(list(have_img)).reshape(want_img.shape)
    torch.testing.assert_close(have_img, want_img, atol=1e-5, rtol=1e-5)


def test_llava_without_image_token_is_refused_not_invented(tmp_path):
    model, llm_dir = _xtuner_llava(tmp_path, with_image_token=False)
    with pytest.raises(ConversionError, match=r"no '<image>'.*does not add it with an invented embedding row"):
        export_hf(model, tmp_path / "out", converter=dict(type="llava", tokenizer=str(llm_dir)))
    assert not (tmp_path / "out").exists()


def test_internvl_export_of_xtuner_internvl_v1_5(tmp_path):
    xtuner_or_skip("InternVL_V1_5")
    apply_torch_cpu_bf16_shim()
    from transformers import AutoModel
    from xtuner.model import InternVL_V1_5
    from sa2va_demo.families import make_internvl_dir
    base = make_internvl_dir(tmp_path / "internvl")
    model = InternVL_V1_5(model_path=str(base), freeze_llm=True, freeze_visual_encoder=True,
                          llm_lora=dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.0,
                                        target_modules=["q_proj", "v_proj", "gate_proj"]))
    model = model.float()
    model.model.mlp1.requires_grad_(True)  # the projector is trained, as InternVL fine-tunes do
    train_like(model)
    model.eval()
    before = snapshot_params(model)
    m = export_hf(model, tmp_path / "out", dtype="fp32")
    assert_unchanged(model, before)
    assert m.converter == "internvl"

    hf, info = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True, torch_dtype=torch.float32,
                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    got = snapshot_tensors(tmp_path / "out")
    llm_ref = copy.deepcopy(model.model.language_model).merge_and_unload().state_dict()
    assert all(torch.equal(got["language_model." + k], v) for k, v in llm_ref.items())
    assert torch.equal(got["mlp1.1.weight"], model.model.mlp1[1].weight)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    # the base directory's config, not xtuner's in-memory edit asking for flash attention
    assert cfg["llm_config"].get("_attn_implementation") != "flash_attention_2"
    assert cfg["auto_map"]["AutoModel"] == "modeling_tiny_internvl.TinyInternVLChatModel"
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    pix, ids = torch.randn(2, 3, 16, 16, generator=G), torch.randint(4, 60, (2, 6), generator=G)
    with torch.no_grad():
        inner = model.model
        img = inner.mlp1(inner.vision_model(pix))
        emb = inner.language_model.get_input_embeddings()(ids)
        want = inner.language_model(inputs_embeds=torch.cat([img, emb], 1)).logits
        have = hf.eval()(pix, ids).logits
    torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


def test_sa2va_qwen_export_loads_with_remote_code(tmp_path):
    from pathlib import Path
    transformers_class_or_skip("Qwen2VLForConditionalGeneration")
    from transformers import AutoModel, Qwen2VLImageProcessor
    import sa2va_demo.hf_code_qwen as code
    from sa2va_demo.families import TinySa2VAQwen
    model = TinySa2VAQwen()
    tok = model.tokenizer
    train_like(model)
    model.eval()
    before = snapshot_params(model)
    m = export_hf(model, tmp_path / "out", dtype="bf16", converter=dict(
        type="sa2va_qwen", hf_code_dir=str(Path(code.__file__).parent), processor=Qwen2VLImageProcessor(),
        auto_map={"AutoConfig": "configuration_tiny_sa2va_qwen.TinySa2VAQwenConfig",
                  "AutoModel": "modeling_tiny_sa2va_qwen.TinySa2VAQwenChatModel"},
        architectures=["TinySa2VAQwenChatModel"]))
    assert_unchanged(model, before)
    assert m.converter == "sa2va_qwen"
    # Qwen2-VL's own layout (transformers 5 nests the vision tower one level deeper): its key, prefixed
    ref = copy.deepcopy(model.mllm.model).float().merge_and_unload().state_dict()
    assert "model." + next(k for k in ref if k.endswith("visual.patch_embed.proj.weight")) in m.tensors
    assert "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight" in m.tensors

    hf, info = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True, torch_dtype=torch.float32,
                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    text_cfg = out_cfg.get("text_config") or out_cfg  # transformers >= 5 keeps the LLM's sizes there
    assert text_cfg["vocab_size"] == len(tok) and out_cfg["template"] == "qwen2_vl_chat"
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    got = snapshot_tensors(tmp_path / "out")
    assert all(torch.equal(got["model." + k], v.to(torch.bfloat16)) for k, v in ref.items())
    ids = torch.randint(4, 60, (2, 6), generator=G)
    with torch.no_grad():
        want = model.mllm.model(input_ids=ids).logits
        have = hf.eval()(ids).logits
    assert float(torch.linalg.vector_norm(have - want) / torch.linalg.vector_norm(want)) < 2e-2


@pytest.mark.parametrize("config,hf_class", [("xtuner_tiny_llava", "LlavaForConditionalGeneration"),
                                             ("xtuner_tiny_internvl", "AutoModel"),
                                             ("tiny_sa2va_qwen_demo", "AutoModel")])
def test_family_demo_config_trains_with_the_hooks_and_exports_loadable_snapshots(config, hf_class, tmp_path):
    if config == "tiny_sa2va_qwen_demo":  # not an xtuner model, but trained through xtuner's train entry point
        transformers_class_or_skip("Qwen2VLForConditionalGeneration")
        xtuner_or_skip("Qwen2VLForConditionalGeneration")
    else:
        xtuner_or_skip("Qwen2ForCausalLM")
    import os
    import subprocess
    import sys
    from pathlib import Path

    import transformers
    from sa2va_hooks.core.verify import verify_snapshot
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "tools" / "train.py"), str(root / "configs" / f"{config}.py"),
                           "--work-dir", str(tmp_path / "wd")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for it in (2, 4):
        snap = tmp_path / "wd" / "hf" / f"iter_{it}"
        assert verify_snapshot(snap) == []
        effect = json.loads((snap / "export_manifest.json").read_text())["training_effect"]
        assert effect["trained_differ_from_base"] == effect["trained_tensors"] > 0
        _, info = getattr(transformers, hf_class).from_pretrained(snap, trust_remote_code=True,
                                                                  output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
