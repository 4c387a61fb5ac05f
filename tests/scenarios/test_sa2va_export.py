"""The Sa2VA-shaped model trained by a real mmengine Runner with the hooks: what the in-loop
export holds, compared against the base files and a from_pretrained reload."""
from __future__ import annotations

import json
import re

import torch
from mmengine.runner import Runner
from safetensors.torch import load_file
from transformers import AutoModel

from conftest import assert_unchanged, snapshot_params, snapshot_tensors
from sa2va_hooks import export_hf
from sa2va_hooks.core.manifest import ExportManifest
from sa2va_demo.hf_code.configuration_tiny_sa2va import TinySa2VAConfig
from sa2va_demo.hf_code.modeling_tiny_sa2va import TinySa2VAChatModel
from sa2va_demo.runs import tiny_config
from sa2va_demo.tiny_sa2va import SAM2_FILE

# Written from Sa2VA's training setup, not from the converter: what training touches.
TRAINED = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$"
                     r"|^language_model\.(model\.embed_tokens|lm_head)\.weight$"
                     r"|^grounding_encoder\.sam2_model\.sam_mask_decoder\."
                     r"|^text_hidden_fcs\.")


def _base_tensors(base_dir, initial_model) -> dict[str, torch.Tensor]:
    """The starting point in HF names, from the base files themselves (plus the heads that the
    training model initialises, taken from an untrained Runner-built model)."""
    base = dict(load_file(base_dir / "model.safetensors"))
    for k, v in torch.load(base_dir / SAM2_FILE, weights_only=True).items():
        base["grounding_encoder." + k.replace(".gamma", ".g_weight")] = v
    for k, v in initial_model.text_hidden_fcs.state_dict().items():
        base["text_hidden_fcs." + k] = v
    return base


def test_sa2va_export_keys_trained_and_frozen_tensors(trained_run, tiny_base):
    runner, work = trained_run
    snap = work / "hf" / "iter_6"
    exported = snapshot_tensors(snap)
    cfg = json.loads((snap / "config.json").read_text())
    hf_keys = set(TinySa2VAChatModel(TinySa2VAConfig(**cfg)).state_dict())
    assert set(exported) == hf_keys

    initial = Runner.from_cfg(tiny_config(work.parent / "initial", tiny_base, seed=0, data_seed=0)).model
    base = _base_tensors(tiny_base, initial)
    trained = sorted(k for k in exported if TRAINED.search(k))
    frozen = sorted(k for k in exported if not TRAINED.search(k))
    assert len(trained) == 2 * 7 + 2 + 4 + 4 and len(frozen) > 20
    same = [k for k in trained if exported[k].shape == base[k].shape
            and torch.equal(exported[k], base[k].to(exported[k].dtype))]
    assert not same, f"trained tensors identical to the base: {same}"
    # the resized embeddings keep the base rows' trained values apart from the [SEG] row
    for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert exported[k].shape[0] == base[k].shape[0] + 1
        assert not torch.equal(exported[k][:-1], base[k].to(torch.bfloat16))
    changed = [k for k in frozen if not torch.equal(exported[k], base[k].to(exported[k].dtype))]
    assert not changed, f"frozen tensors changed: {changed}"
    assert cfg["llm_config"]["vocab_size"] == 65 and cfg["template"] == "tiny_chat"
    assert cfg["auto_map"]["AutoModel"] == "modeling_tiny_sa2va.TinySa2VAChatModel"
    assert (snap / "modeling_tiny_sa2va.py").is_file() and (snap / "tokenizer.json").is_file()
    tok = json.loads((snap / "tokenizer.json").read_text())
    assert any(t["content"] == "[SEG]" for t in tok["added_tokens"])


def test_sa2va_export_reloads_with_from_pretrained_and_matches_logits(trained_run):
    runner, work = trained_run
    hf, info = AutoModel.from_pretrained(work / "hf" / "iter_6", trust_remote_code=True, torch_dtype=torch.float32,
                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    live = runner.model.eval()
    g = torch.Generator().manual_seed(0)
    pix, ids = torch.randn(3, 3, 16, 16, generator=g), torch.randint(4, 60, (3, 8), generator=g)
    with torch.no_grad():
        want, got = live(pix, ids, mode="tensor"), hf(pix, ids).logits
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    gamma = live.grounding_encoder.sam2_model.memory_encoder.fuser.layers[0].gamma
    g_weight = hf.grounding_encoder.sam2_model.memory_encoder.fuser.layers[0].g_weight
    assert torch.equal(g_weight, gamma.to(torch.bfloat16).float())


def test_export_hf_on_sa2va_model_does_not_touch_it(trained_run, tmp_path):
    runner, work = trained_run
    before = snapshot_params(runner.model)
    m = export_hf(runner.model, tmp_path / "again", converter="tiny_sa2va", dtype="bf16")
    assert_unchanged(runner.model, before)
    assert m.converter == "tiny_sa2va"
    # the model after the last iteration is the model the hook exported at iteration 6
    assert m.root_digest == ExportManifest.load(work / "hf" / "iter_6").root_digest
