"""Benchmark: the hooks under mmengine's FlexibleRunner with DeepSpeed ZeRO-2 / ZeRO-3 and FSDP on 2 GPUs,
against a single-GPU export of the same weights, measured in the same command.

    python benchmarks/bench_distributed.py single                       # 1 GPU: the reference export
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py zero2   # (and zero3, fsdp)

Model: Qwen2-shaped (SIZE=1.5b by default; 7b, tiny), bf16, LoRA r=64 on every linear layer,
"fake-trained" by seeded noise on every trainable tensor, so every process builds exactly the
same weights. No ``modules_to_save``: PEFT's ModulesToSaveWrapper fails in the first ZeRO-3
forward with DeepSpeed 0.18.9 ('Linear' object has no attribute 'ds_grads_remaining'), with or
without our hooks (docs/decisions.md).

Each distributed run:
1. before training, one collective ``export_hf`` of those weights (all ranks write shards): its
   root digest must equal the single-GPU export's; per rank: wall time, peak extra GPU memory
   (``max_memory_allocated`` over what was allocated before) and peak extra host RSS;
2. a real FlexibleRunner training loop (synthetic tokens, AdamW) with ``HFExportHook(interval=4)``
   at its defaults otherwise (the export also fingerprints the trainable tensors): iteration
   times with and without an export; the stall is the export iteration's time minus the median
   of the ordinary ones, per rank.
Writes JSON lines to $OUT (or BENCH_OUT) /bench_distributed.jsonl; prints a table at the end of
each run.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PeakRSS, qwen2_config  # noqa: E402

OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")
WORK = Path(os.environ.get("WORK", "/tmp/bench_dist"))
SIZE = os.environ.get("SIZE", "1.5b")
SEQ = int(os.environ.get("SEQ", "1024"))
RANK = int(os.environ.get("RANK", "0"))
CUDA = torch.cuda.is_available()  # without CUDA: a CPU smoke run (gloo, fp32, tests/dist_launch.py's workarounds)
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def gpu_mark() -> int:
    if not CUDA:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def gpu_peak_extra(g0: int) -> float | None:
    return round((torch.cuda.max_memory_allocated() - g0) / 2**30, 3) if CUDA else None


def log(step: str, **kw) -> None:
    kw = {"step": step, "rank": RANK, "size": SIZE, **kw}
    line = json.dumps(kw)
    print(line, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "bench_distributed.jsonl", "a") as f:
        f.write(line + "\n")


def make_config():
    return qwen2_config(SIZE)


def build_model(device: str):
    """The same bf16 weights in every process: seeded init, seeded noise on every trainable tensor."""
    from mmengine.model import BaseModel
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    class BenchModel(BaseModel):
        def __init__(self, llm) -> None:
            super().__init__()
            self.llm = llm

        def init_weights(self) -> None:
            """The weights are built and fake-trained already; mmengine's strategy would otherwise
            re-run transformers' random init on them."""

        def forward(self, input_ids=None, labels=None, mode="loss", **kw):
            return {"loss": self.llm(input_ids=input_ids, labels=labels).loss}

    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen2ForCausalLM(make_config()).to(DTYPE)
    pm = get_peft_model(base, LoraConfig(
        r=64, lora_alpha=128, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).to(DTYPE)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype) * 1e-3)
    return BenchModel(pm)


def measured_export(model, out: Path, group=None) -> dict:
    from sa2va_hooks import export_hf
    g0 = gpu_mark()
    with PeakRSS() as m:
        t = time.perf_counter()
        manifest = export_hf(model, out, dtype="bf16", max_shard_size="2GB", overwrite=True, group=group)
        dt = time.perf_counter() - t
    gib = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**30
    return dict(s=round(dt, 2), gib=round(gib, 2), gib_s=round(gib / dt, 3), root=manifest.root_digest,
                extra_rss_gib=m.extra_gib, gpu_peak_extra_gib=gpu_peak_extra(g0),
                shards=len(manifest.provenance.get("shard_writers", {})), tensors=len(manifest.tensors))


def single() -> None:
    from sa2va_hooks.core.dist import RankGroup
    model = build_model(DEVICE)
    log("model", params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        device=torch.cuda.get_device_name(0) if CUDA else "cpu", torch=torch.__version__)
    measured_export(model, WORK / "single_warmup", RankGroup(0, 1))  # one-time costs out of the number
    r = measured_export(model, WORK / "single", RankGroup(0, 1))
    log("single_gpu_export", **r)
    (WORK / "single_root.txt").write_text(r["root"])


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int) -> None:
        self.n, self.vocab = n, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, self.vocab, (SEQ,), generator=g)
        return {"input_ids": ids, "labels": ids}


def _collate(batch: list[dict]) -> dict:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def distributed(mode: str) -> None:
    from mmengine.hooks import Hook
    from mmengine.runner import FlexibleRunner

    import sa2va_hooks  # noqa: F401 - registers the hooks
    from sa2va_hooks.hooks import hf_export_hook
    from sa2va_hooks.hooks.common import unwrapped_model

    iter_times: list[tuple[int, float]] = []
    exports: list[dict] = []
    single_root = (WORK / "single_root.txt").read_text().strip() if (WORK / "single_root.txt").is_file() else None

    class Clock(Hook):
        priority = "HIGHEST"

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            sync()
            self.t = time.perf_counter()

        def before_train(self, runner):
            if os.environ.get("NOPRE"):
                return
            r = measured_export(unwrapped_model(runner), WORK / f"{mode}_pre")
            log(f"{mode}_collective_export", **r, equals_single_gpu=(r["root"] == single_root) if single_root else None)

    class ClockEnd(Hook):
        priority = "LOWEST"

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            sync()
            iter_times.append((runner.iter + 1, time.perf_counter() - clock.t))

    real = hf_export_hook.HFExportHook._export_at

    def timed(self, runner, point):
        g0 = gpu_mark()
        with PeakRSS() as m:
            t = time.perf_counter()
            real(self, runner, point)
            sync()
        exports.append(dict(iter=point["iter"], s=round(time.perf_counter() - t, 2), extra_rss_gib=m.extra_gib,
                            gpu_peak_extra_gib=gpu_peak_extra(g0)))

    hf_export_hook.HFExportHook._export_at = timed
    clock = Clock()
    if mode == "fsdp":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
        wrapper = dict(type="MMFullyShardedDataParallel", auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}))
        if not CUDA:
            wrapper["device_id"] = torch.device("cpu")
        strategy = dict(type="FSDPStrategy", model_wrapper=wrapper)
        optim = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-5))
    else:
        zero = {"zero2": dict(stage=2, overlap_comm=True), "zero3": dict(stage=3, overlap_comm=True)}[mode]
        strategy = dict(type="DeepSpeedStrategy", config=dict(bf16=dict(enabled=CUDA), zero_optimization=zero,
                                                              zero_allow_untested_optimizer=True),
                        gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=1, gradient_clipping=1.0,
                        exclude_frozen_parameters=True)
        optim = dict(type="DeepSpeedOptimWrapper", optimizer=dict(type="AdamW", lr=1e-5))
    if CUDA:  # build on this rank's GPU (FSDP checks the module's device against its device_id)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model = build_model(DEVICE)
    loader = torch.utils.data.DataLoader(_Tokens(64, make_config().vocab_size), batch_size=1, collate_fn=_collate,
                                         sampler=torch.utils.data.distributed.DistributedSampler(
                                             _Tokens(64, 1), num_replicas=2, rank=RANK, shuffle=False))
    runner = FlexibleRunner(
        model=model, work_dir=str(WORK / f"{mode}_wd"), train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=12),
        optim_wrapper=optim, strategy=strategy, launcher="pytorch",
        env_cfg=dict(dist_cfg=dict(backend="nccl" if CUDA else "gloo")),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=10**6, save_last=False),
                           logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[clock, dict(type="HFExportHook", interval=4, dtype="bf16", max_shard_size="2GB", keep_last=1),
                      ClockEnd()])
    runner.train()
    export_iters = {e["iter"] for e in exports}
    normal = [t for it, t in iter_times if it not in export_iters and it > 2]
    base = statistics.median(normal)
    for e in exports:
        it_time = dict(iter_times)[e["iter"]]
        log(f"{mode}_in_loop_export", **e, iter_s=round(it_time, 3), normal_iter_s=round(base, 3),
            stall_s=round(it_time - base, 2))


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    if not CUDA:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from dist_launch import _cpu_workarounds
        _cpu_workarounds()
    mode = sys.argv[1]
    if mode == "single":
        single()
    else:
        distributed(mode)


if __name__ == "__main__":
    main()
