"""Real xtuner: its own train entry point trains a tiny LoRA SupervisedFinetune with the hooks,
and the in-loop export equals PEFT's own load-and-merge of the checkpoint xtuner saved."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from sa2va_hooks.compat import allow_mmengine_checkpoint_globals, apply_torch_cpu_bf16_shim
from sa2va_hooks.core.fingerprint import FingerprintSet, fingerprint_tensor
from sa2va_hooks.core.verify import verify_snapshot

from conftest import peft_saved_form, snapshot_tensors, xtuner_or_skip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def xtuner_run(tmp_path_factory):
    xtuner_or_skip("Qwen2ForCausalLM")
    cwd = tmp_path_factory.mktemp("xtuner")
    env = {**os.environ, "SA2VA_TINY_LLM": "work_dirs/tiny_llm", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"),
                           str(ROOT / "configs" / "xtuner_tiny_lora_sft.py"), "--work-dir", str(cwd / "wd")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, proc.stdout + proc.stderr


def _peft_reference(cwd: Path, it: int):
    """Base from disk + xtuner's saved adapter, loaded and merged by PEFT itself."""
    allow_mmengine_checkpoint_globals()
    ckpt = torch.load(cwd / "wd" / f"iter_{it}.pth", map_location="cpu", weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(cwd / "work_dirs" / "tiny_llm", torch_dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]))
    assert all("lora_" in k for k in ckpt["state_dict"]), list(ckpt["state_dict"])[:5]
    result = set_peft_model_state_dict(pm, peft_saved_form(ckpt["state_dict"]))
    assert not result.unexpected_keys
    return pm, ckpt


def test_xtuner_train_entry_point_exports_what_peft_merges(xtuner_run):
    cwd, log = xtuner_run
    assert "[sa2va_hooks] exported iter 6" in log
    for it in (3, 6):
        snap = cwd / "wd" / "hf" / f"iter_{it}"
        assert verify_snapshot(snap) == []
        pm, ckpt = _peft_reference(cwd, it)
        recorded = FingerprintSet.from_json(ckpt["meta"]["sa2va_hooks"]["trained"])
        # the fingerprints recorded in meta are those of the tensors xtuner saved, recomputed here
        assert len(recorded.tensors) == 28
        assert {k: fingerprint_tensor(k, v).digest for k, v in ckpt["state_dict"].items()} == \
            {k: fp.digest for k, fp in recorded.tensors.items()}
        ref = {k: v.to(torch.bfloat16) for k, v in pm.merge_and_unload().state_dict().items()}
        got = snapshot_tensors(snap)
        assert set(got) == set(ref)
        assert [k for k in ref if not torch.equal(ref[k], got[k])] == []


def test_xtuner_export_reloads_with_tokenizer_and_logits(xtuner_run):
    cwd, _ = xtuner_run
    snap = cwd / "wd" / "hf" / "iter_6"
    pm, _ = _peft_reference(cwd, 6)
    reloaded = AutoModelForCausalLM.from_pretrained(snap, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(snap)
    ids = tok(["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5"], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = pm.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


def test_cpu_bf16_shim_applies_only_when_missing(monkeypatch):
    real = getattr(torch.cpu, "is_bf16_supported", None)
    if real is not None:
        assert apply_torch_cpu_bf16_shim() is False and torch.cpu.is_bf16_supported is real
        monkeypatch.delattr(torch.cpu, "is_bf16_supported")
    else:
        monkeypatch.setattr(torch.cpu, "is_bf16_supported", None, raising=False)
        monkeypatch.delattr(torch.cpu, "is_bf16_supported")
    assert apply_torch_cpu_bf16_shim() is True
    assert torch.cpu.is_bf16_supported() is False
    sentinel = lambda: True  # noqa: E731
    monkeypatch.setattr(torch.cpu, "is_bf16_supported", sentinel)
    assert apply_torch_cpu_bf16_shim() is False and torch.cpu.is_bf16_supported is sentinel


def test_offline_export_of_xtuner_checkpoint_equals_in_loop_export(xtuner_run):
    """tools/export.py on the xtuner config (lazy-import mode) and xtuner's own checkpoint."""
    cwd, _ = xtuner_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"),
                           str(ROOT / "configs" / "xtuner_tiny_lora_sft.py"), str(cwd / "wd" / "iter_6.pth"),
                           "--out", str(cwd / "offline"), "--json"], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    inloop = json.loads((cwd / "wd" / "hf" / "iter_6" / "export_manifest.json").read_text())
    offline = json.loads((cwd / "offline" / "export_manifest.json").read_text())
    assert offline["root_digest"] == inloop["root_digest"] == json.loads(proc.stdout)["root_digest"]
    assert offline["files"] == inloop["files"]
    assert offline["provenance"]["offline"]["verification"]["checked"] is True
