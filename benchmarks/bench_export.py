"""Benchmark: in-loop export of a LoRA-trained 7B-class model, against the anchors, same run.

Method as ../shared/bench/anchor_baseline.py (same model shape, LoRA r=64 on all linear layers,
modules_to_save embed_tokens/lm_head, fake training), measured side by side:
  raw     raw sequential write of 8 GiB with fsync (the disk's floor)
  ours    sa2va_hooks.export_hf on the live PeftModel on the GPU: fp32 merge out of place,
          bf16 cast, sharded safetensors, fingerprints, read-back verification, atomic publish;
          the model is checked bit-identical afterwards
  ours_nr the same without read-back (to show its cost)
  peft    PEFT merge_and_unload() on the GPU + save_pretrained() (mutates the model; last)
Prints one JSON line per step and a ratio table. Env: SIZE=7b|1.5b|tiny, WORK=scratch dir,
BENCH_OUT=results dir.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PeakRSS, qwen2_config  # noqa: E402

OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")
WORK = Path(os.environ.get("WORK", "/tmp/bench"))
SIZE = os.environ.get("SIZE", "7b")
OUT.mkdir(parents=True, exist_ok=True)
WORK.mkdir(parents=True, exist_ok=True)
T0 = time.time()
RESULTS: dict[str, dict] = {}


def log(step: str, **kw) -> None:
    kw = {"step": step, **kw, "t": round(time.time() - T0, 1)}
    RESULTS[step] = kw
    line = json.dumps(kw)
    print(line, flush=True)
    with open(OUT / "bench_export.jsonl", "a") as f:
        f.write(line + "\n")


def dir_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def make_config():
    return qwen2_config(SIZE)


def raw_write(gib: int) -> None:
    buf = os.urandom(256 * 2**20)
    p = WORK / "raw.bin"
    t = time.time()
    with open(p, "wb") as f:
        for _ in range(gib * 4):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    dt = time.time() - t
    log("raw_write_fsync", gib=gib, s=round(dt, 2), gib_s=round(gib / dt, 3))
    p.unlink()


def build_peft_model(device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2ForCausalLM(make_config())
    torch.set_default_dtype(torch.float32)
    pm = get_peft_model(model, LoraConfig(
        r=64, lora_alpha=128, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["embed_tokens", "lm_head"]))
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype) * 1e-3)
    return pm


def state_root(model) -> str:
    from sa2va_hooks.core.fingerprint import FingerprintSet, fingerprint_state
    return FingerprintSet.of(fingerprint_state(model.named_parameters())).root


def sync_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(pm, name: str, readback: bool) -> None:
    from sa2va_hooks import export_hf
    out = WORK / name
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        g0 = torch.cuda.memory_allocated()
    with PeakRSS() as m:
        t = time.time()
        manifest = export_hf(pm, out, dtype="bf16", max_shard_size="5GB", readback=readback)
        os.sync()
        dt = time.time() - t
    gib = dir_gib(out)
    gpu_extra = round((torch.cuda.max_memory_allocated() - g0) / 2**30, 2) if torch.cuda.is_available() else None
    log(name, s=round(dt, 2), gib=round(gib, 2), gib_s=round(gib / dt, 3), extra_rss_gb=m.extra_gib,
        gpu_peak_extra_gb=gpu_extra, tensors=len(manifest.tensors), readback=readback,
        trained_differ=manifest.training_effect["trained_differ_from_base"],
        trained=manifest.training_effect["trained_tensors"])
    shutil.rmtree(out)


def run_peft(pm) -> None:
    out = WORK / "peft"
    with PeakRSS() as m:
        t = time.time()
        merged = pm.merge_and_unload()
        sync_cuda()
        tm = time.time() - t
        merged.save_pretrained(out, max_shard_size="5GB")
        os.sync()
        dt = time.time() - t
    gib = dir_gib(out)
    log("peft_merge_and_unload_save_pretrained", merge_s=round(tm, 2), s=round(dt, 2), gib=round(gib, 2),
        gib_s=round(gib / dt, 3), extra_rss_gb=m.extra_gib)
    shutil.rmtree(out)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log("env", torch=torch.__version__, device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        cpus=os.cpu_count(), ram_gib=round(psutil.virtual_memory().total / 2**30), size=SIZE)
    raw_write(8 if SIZE != "tiny" else 1)
    pm = build_peft_model(device)
    n = sum(p.numel() for p in pm.parameters())
    log("model", params_b=round(n / 1e9, 3), device=device)
    before = state_root(pm)
    run_ours(pm, "ours", readback=True)
    run_ours(pm, "ours_no_readback", readback=False)
    run_ours(pm, "ours_repeat", readback=True)
    log("live_model_unchanged", same=state_root(pm) == before)
    run_peft(pm)
    raw = RESULTS["raw_write_fsync"]["gib_s"]
    peft_s = RESULTS["peft_merge_and_unload_save_pretrained"]["s"]
    print("\n| step | s | GiB/s | x raw write speed | time / PEFT time | extra RSS GiB |")
    print("|---|---|---|---|---|---|")
    for k in ("ours", "ours_repeat", "ours_no_readback", "peft_merge_and_unload_save_pretrained"):
        r = RESULTS[k]
        print(f"| {k} | {r['s']} | {r['gib_s']} | {r['gib_s'] / raw:.2f} | {r['s'] / peft_s:.2f} | "
              f"{r['extra_rss_gb']} |")


if __name__ == "__main__":
    main()
