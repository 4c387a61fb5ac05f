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
2. a real FlexibleRunner training loop (synthetic tokens, AdamW) in two phases, one runner, one
   process: REF_ITERS iterations with no export (the reference: HFExportHook is registered, set up
   before training, and exports nothing yet), then ITERS iterations with ``HFExportHook`` exporting
   every INTERVAL iterations (counted from the phase's start; at its defaults otherwise: background,
   mode "auto", i.e. "captured" under ZeRO-2, "partitioned" or "gathered" under ZeRO-3/FSDP).
   Per rank (issue 18, "No stall on any strategy"):
   - paused per export: the training thread's time in the hook (``_export_at``, timed around it;
     the hook's own figure, from its log line "training paused X s" / "gathered in X s", beside it);
   - whole cost per export = (sum of the hooked phase's iteration times + the wait for the last
     export after the last iteration - ITERS x the mean reference iteration) / exports. The first
     WARMUP reference iterations are left out. "noise" = the sd of a reference iteration x
     sqrt(ITERS) / exports: a whole cost below it is not distinguishable from zero;
   - the slowdown of the iterations that overlap a background export (its start: the hook's call;
     its end: its "exported ... in the background" log line), not counting the export iterations,
     over the mean reference iteration, in percent;
   - bytes written and hard-linked by the second export (the hook's log line);
   - peak extra host RSS and GPU memory: the hooked phase's peak minus the reference phase's, and
     the capture buffers the hook allocates before training (in both phases' RSS; added in
     "extra_rss_gib_with_buffers").
   INTERVAL must be long enough for an export to finish before the next one is due: otherwise the
   hook waits for it (the wait is counted in the whole cost, and "waited_s" says so).
Environment: SIZE (tiny, 0.5b, 1.5b, 7b), SEQ (tokens per sample; default 1024, 32 for tiny),
INTERVAL (default 2 tiny, 8 at 1.5b and below, 10 at 7b), EXPORTS (default 2), ITERS (default
EXPORTS*INTERVAL + INTERVAL - 1: the last INTERVAL-1 let the last export finish), REF_ITERS
(default max(INTERVAL, 4)), WARMUP (default 2), MAX_SHARD (the in-loop export's max_shard_size;
default 2GB, 4MB for tiny), NOPRE=1 (skip step 1), WORK, BENCH_OUT/OUT.
All are printed in the "config" line.
Writes JSON lines to $OUT (or BENCH_OUT) /bench_distributed.jsonl; rank 0 prints a table of
both ranks' figures next to the issue's targets at the end of each run.

    python benchmarks/bench_distributed.py --plot bench_distributed.jsonl out.png

plots paused and whole cost per export (the larger rank's) per strategy and size, from the
"*_summary" lines of any number of runs.
"""
from __future__ import annotations

import json
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PeakRSS, pyplot, qwen2_config, second_export  # noqa: E402

OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")
WORK = Path(os.environ.get("WORK", "/tmp/bench_dist"))
SIZE = os.environ.get("SIZE", "1.5b")
SEQ = int(os.environ.get("SEQ", "32" if SIZE == "tiny" else "1024"))
RANK = int(os.environ.get("RANK", "0"))
INTERVAL = int(os.environ.get("INTERVAL", {"tiny": "2", "7b": "10"}.get(SIZE, "8")))
EXPORTS = int(os.environ.get("EXPORTS", "2"))
ITERS = int(os.environ.get("ITERS", str(EXPORTS * INTERVAL + INTERVAL - 1)))
REF_ITERS = int(os.environ.get("REF_ITERS", str(max(INTERVAL, 4))))
WARMUP = min(int(os.environ.get("WARMUP", "2")), REF_ITERS - 2)
MAX_SHARD = os.environ.get("MAX_SHARD", "4MB" if SIZE == "tiny" else "2GB")
LORA = os.environ.get("LORA", "all")  # "attn": q/k/v/o only, so most of the model is frozen (hard links)
if LORA not in ("all", "attn"):
    raise SystemExit(f"LORA must be 'all' or 'attn', got {LORA!r}")
TARGETS = {"whole_cost_s": 0.3, "overlap_slowdown_pct": 5.0, "paused_s": 0.3}
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
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        + (["gate_proj", "up_proj", "down_proj"] if LORA == "all" else []))).to(DTYPE)
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


class _Collect(logging.Handler):
    """HFExportHook's log lines on this rank: pauses, finished exports (seconds, bytes written and
    hard-linked, when), waits, skips, errors, the capture buffers."""

    EXPORTED = re.compile(r"exported iter (\d+) .*? in (?:the background in )?([\d.]+)s.*?\((\d+) written, (\d+) "
                          r"hard-linked")
    PAUSED = re.compile(r"export of iter (\d+) .*?(?:training paused ([\d.]+)s|gathered in ([\d.]+)s)")
    WAITED = re.compile(r"waited ([\d.]+)s for the background export")
    BUFFERS = re.compile(r"(\d+) bytes of capture buffers")

    def __init__(self) -> None:
        super().__init__()
        self.exports: dict[int, dict] = {}
        self.paused: dict[int, float] = {}
        self.modes: dict[int, str] = {}
        self.waited: list[float] = []
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.buffers = 0

    def emit(self, record) -> None:
        msg, now = record.getMessage(), time.perf_counter()
        if m := self.EXPORTED.search(msg):
            self.exports[int(m.group(1))] = {"s": float(m.group(2)), "written": int(m.group(3)),
                                             "linked": int(m.group(4)), "end": now}
        elif m := self.PAUSED.search(msg):
            self.paused[int(m.group(1))] = float(m.group(2) or m.group(3))
            self.modes[int(m.group(1))] = "gathered" if m.group(3) else "background"
        elif m := self.WAITED.search(msg):
            self.waited.append(float(m.group(1)))
        elif m := self.BUFFERS.search(msg):
            self.buffers = int(m.group(1))
        if "SKIPPED" in msg:
            self.skipped.append(msg)
        if record.levelno >= logging.ERROR:
            self.errors.append(msg)


def distributed(mode: str) -> None:
    from mmengine.hooks import Hook
    from mmengine.runner import FlexibleRunner

    import sa2va_hooks  # noqa: F401 - registers the hooks
    from sa2va_hooks.hooks import hf_export_hook
    from sa2va_hooks.hooks.common import checkpoint_point, unwrapped_model

    log("config", mode=mode, lora=LORA, seq=SEQ, max_shard_size=MAX_SHARD, interval=INTERVAL, exports=EXPORTS,
        iters=ITERS,
        ref_iters=REF_ITERS,
        warmup=WARMUP, world=int(os.environ.get("WORLD_SIZE", "1")), cuda=CUDA,
        device=torch.cuda.get_device_name(0) if CUDA else "cpu", torch=torch.__version__)
    iters: dict[int, tuple[float, float]] = {}  # iteration (1-based) -> (start, end), perf_counter
    exports: list[dict] = []
    phase: dict = {}
    single_root = (WORK / "single_root.txt").read_text().strip() if (WORK / "single_root.txt").is_file() else None

    def gpu_alloc_peak() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if CUDA else None

    class Clock(Hook):
        priority = "HIGHEST"

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            sync()
            if runner.iter in (0, REF_ITERS):  # a phase starts: its own peaks
                if runner.iter == REF_ITERS:
                    phase["ref_rss"].__exit__()
                    phase["ref_gpu"] = gpu_alloc_peak()
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                key = "ref_rss" if runner.iter == 0 else "hooked_rss"
                phase[key] = PeakRSS().__enter__()
            self.t = time.perf_counter()

        def before_train(self, runner):
            if os.environ.get("NOPRE"):
                return
            r = measured_export(unwrapped_model(runner), WORK / f"{mode}_pre")
            log(f"{mode}_collective_export", **r, equals_single_gpu=(r["root"] == single_root) if single_root else None)

        def after_train(self, runner):  # before HFExportHook waits for the export in flight
            sync()
            phase["end"] = time.perf_counter()

    class ClockEnd(Hook):
        priority = "LOWEST"

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            sync()
            iters[runner.iter + 1] = (clock.t, time.perf_counter())

        def after_train(self, runner):  # registered after HFExportHook: after its wait for the last export
            sync()
            phase["end_wait_s"] = time.perf_counter() - phase["end"]
            phase["hooked_rss"].__exit__()
            phase["hooked_gpu"] = gpu_alloc_peak()

    class PhasedExport(hf_export_hook.HFExportHook):
        """Exports every INTERVAL iterations of the hooked phase only (none in the reference one)."""

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            k = runner.iter + 1 - REF_ITERS
            if k > 0 and k % INTERVAL == 0:
                it, epoch = checkpoint_point(runner, "iter")
                self._export_at(runner, {"iter": it, "epoch": epoch})

    real = hf_export_hook.HFExportHook._export_at

    def timed(self, runner, point):
        g0 = gpu_mark()
        with PeakRSS() as m:
            t = time.perf_counter()
            real(self, runner, point)
            sync()
        exports.append(dict(iter=point["iter"], start=t, hook_s=round(time.perf_counter() - t, 3),
                            extra_rss_gib=m.extra_gib, gpu_peak_extra_gib=gpu_peak_extra(g0)))

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
    total = REF_ITERS + ITERS
    world = int(os.environ.get("WORLD_SIZE", "2"))
    loader = torch.utils.data.DataLoader(_Tokens(2 * total, make_config().vocab_size), batch_size=1,
                                         collate_fn=_collate,
                                         sampler=torch.utils.data.distributed.DistributedSampler(
                                             _Tokens(world * total, 1), num_replicas=world, rank=RANK, shuffle=False))
    runner = FlexibleRunner(
        model=model, work_dir=str(WORK / f"{mode}_wd"), train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=total),
        optim_wrapper=optim, strategy=strategy, launcher="pytorch",
        env_cfg=dict(dist_cfg=dict(backend="nccl" if CUDA else "gloo")),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=10**6, save_last=False),
                           logger=dict(type="LoggerHook", interval=max(INTERVAL, 1))),
        custom_hooks=[clock, PhasedExport(interval=INTERVAL, dtype="bf16", max_shard_size=MAX_SHARD, keep_last=1),
                      ClockEnd()])
    collect = _Collect()
    runner.logger.addHandler(collect)
    runner.logger.setLevel(logging.INFO)
    runner.train()
    runner.logger.removeHandler(collect)
    summary = summarize(mode, iters, exports, collect, phase)
    log(f"{mode}_summary", **summary)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, summary)
    else:
        rows = [summary]
    if RANK == 0:
        print(table(mode, rows), flush=True)


def summarize(mode: str, iters: dict, exports: list[dict], collect: _Collect, phase: dict) -> dict:
    export_iters = {e["iter"] for e in exports}
    ref = [e - s for it, (s, e) in sorted(iters.items()) if WARMUP < it <= REF_ITERS]
    hooked = {it: (s, e) for it, (s, e) in iters.items() if it > REF_ITERS}
    ref_mean = statistics.mean(ref)
    done = len(collect.exports) or len(exports)
    n = max(done, 1)
    hooked_sum = sum(e - s for s, e in hooked.values()) + phase.get("end_wait_s", 0.0)
    windows = [(x["start"], collect.exports.get(x["iter"], {}).get("end", float("inf"))) for x in exports]
    overlap = sorted(it for it, (s, e) in hooked.items()
                     if it not in export_iters and any(s < w1 and e > w0 for w0, w1 in windows))
    ov_mean = statistics.mean(hooked[it][1] - hooked[it][0] for it in overlap) if overlap else None
    per_export = []
    for x in exports:
        it = x["iter"]
        s, e = iters.get(it, (0.0, 0.0))
        c = collect.exports.get(it, {})
        per_export.append({"iter": it, "hook_s": x["hook_s"], "hook_log_paused_s": collect.paused.get(it),
                           "how": collect.modes.get(it), "iter_s": round(e - s, 3),
                           "export_s": c.get("s"), "written": c.get("written"), "linked": c.get("linked"),
                           "in_hook_extra_rss_gib": x["extra_rss_gib"],
                           "in_hook_gpu_peak_extra_gib": x["gpu_peak_extra_gib"]})
    rss_extra = round((phase["hooked_rss"].peak - phase["ref_rss"].peak) / 2**30, 3)
    gpu_extra = (round(phase["hooked_gpu"] - phase["ref_gpu"], 3)
                 if phase.get("hooked_gpu") is not None and phase.get("ref_gpu") is not None else None)
    finished = [{"written": collect.exports[k]["written"], "linked": collect.exports[k]["linked"]}
                for k in sorted(collect.exports)]
    return {"mode": mode, "seq": SEQ, "interval": INTERVAL, "iters": ITERS, "ref_iters": REF_ITERS,
            "exports_started": len(exports), "exports_done": done, "skipped": len(collect.skipped),
            "errors": collect.errors, "ref_iter_mean_s": round(ref_mean, 4),
            "ref_iter_sd_s": round(statistics.stdev(ref), 4) if len(ref) > 1 else None,
            "hooked_iter_s": [round(e - s, 4) for _, (s, e) in sorted(hooked.items())],
            "end_wait_s": round(phase.get("end_wait_s", 0.0), 3), "waited_s": collect.waited,
            "paused_s": [x["hook_s"] for x in exports],
            "paused_max_s": max((x["hook_s"] for x in exports), default=None),
            "hook_log_paused_s": [collect.paused.get(x["iter"]) for x in exports],
            "whole_cost_per_export_s": round((hooked_sum - ref_mean * len(hooked)) / n, 3),
            "whole_cost_noise_s": (round(statistics.stdev(ref) * len(hooked) ** 0.5 / n, 3) if len(ref) > 1 else None),
            "overlap_iters": len(overlap),
            "overlap_slowdown_pct": round(100 * (ov_mean / ref_mean - 1), 2) if ov_mean is not None else None,
            "second_export": second_export(finished), "per_export": per_export,
            "capture_buffers_gib": round(collect.buffers / 2**30, 3), "extra_rss_gib": rss_extra,
            "extra_rss_gib_with_buffers": round(rss_extra + collect.buffers / 2**30, 3), "extra_gpu_gib": gpu_extra,
            "ref_peak_rss_gib": round(phase["ref_rss"].peak / 2**30, 3),
            "ref_peak_gpu_gib": round(phase["ref_gpu"], 3) if phase.get("ref_gpu") is not None else None,
            "targets": TARGETS}


def _second(sec: dict | None) -> str | None:
    """The second export's bytes: written / linked (written %)."""
    return f"{sec['written']} / {sec['linked']} ({sec['written_pct']})" if sec else None


def _met(value, target: float) -> str:
    return "n/a" if value is None else f"{value} ({'met' if value <= target else 'MISSED'})"


def table(mode: str, rows: list[dict]) -> str:
    t = TARGETS
    lines = [f"{mode} SIZE={SIZE} SEQ={SEQ} INTERVAL={INTERVAL} ITERS={ITERS} REF_ITERS={REF_ITERS}; targets: paused "
             f"<= {t['paused_s']} s, whole cost <= {t['whole_cost_s']} s/export (7.6B), overlapping iterations <= "
             f"{t['overlap_slowdown_pct']} % slower",
             "| run | rank | exports (skipped) | paused s max (per export; hook log) | whole cost s/export (noise) | "
             "ref iter s | overlap iters | overlap slowdown % | 2nd export written / linked B (written %) | "
             "extra RSS GiB (+ buffers) | extra GPU GiB | end wait s |", "|" + "---|" * 12]
    for rank, r in enumerate(rows):
        sec = r["second_export"]
        lines.append(
            f"| {mode} {SIZE} | {rank} | {r['exports_done']} ({r['skipped']}) | "
            f"{_met(r['paused_max_s'], t['paused_s'])} "
            f"({r['paused_s']}; {r['hook_log_paused_s']}) | {_met(r['whole_cost_per_export_s'], t['whole_cost_s'])} "
            f"({r['whole_cost_noise_s']}) | {r['ref_iter_mean_s']} | {r['overlap_iters']} | "
            f"{_met(r['overlap_slowdown_pct'], t['overlap_slowdown_pct'])} | "
            f"{_second(sec)} | "
            f"{r['extra_rss_gib']} (+{r['capture_buffers_gib']}) | {r['extra_gpu_gib']} | {r['end_wait_s']} |")
    return "\n".join(lines)


def plot(jsonl: Path, png: Path) -> None:
    """Paused and whole cost per export (the larger of the ranks') per strategy and size."""
    plt = pyplot()
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if str(r.get("step", "")).endswith("_summary"):
            runs.setdefault((r["size"], r["mode"]), []).append(r)
    order = {"zero2": 0, "zero3": 1, "fsdp": 2}
    keys = sorted(runs, key=lambda k: (float(k[0].rstrip("b")) if k[0] != "tiny" else 0.0, order.get(k[1], 9)))
    labels = [f"{m}\n{s}" for s, m in keys]
    paused = [max(r["paused_max_s"] or 0 for r in runs[k]) for k in keys]
    cost = [max(r["whole_cost_per_export_s"] for r in runs[k]) for k in keys]
    noise = [max(r["whole_cost_noise_s"] or 0 for r in runs[k]) for k in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(keys) + 4), 4))
    ax1.bar(labels, paused, color="tab:blue")
    ax1.axhline(TARGETS["paused_s"], ls="--", c="grey", label=f"target {TARGETS['paused_s']} s")
    ax1.set(ylabel="training paused per export (s, max over ranks)", title="Paused per export")
    ax1.legend()
    ax2.bar(labels, cost, yerr=noise, color="tab:orange", capsize=4)
    ax2.axhline(TARGETS["whole_cost_s"], ls="--", c="grey", label=f"target {TARGETS['whole_cost_s']} s (7.6B)")
    ax2.axhline(0, c="black", lw=0.5)
    ax2.set(ylabel="whole cost per export (s, max over ranks)", title="Whole cost per export (error bar: noise)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--plot":
        return plot(Path(sys.argv[2]), Path(sys.argv[3]))
    WORK.mkdir(parents=True, exist_ok=True)
    if not CUDA:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from dist_launch import _cpu_workarounds
        _cpu_workarounds()
        try:  # dist_launch's "import deepspeed.comm.torch as ..." binds torch itself (deepspeed.comm's attribute)
            import importlib
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        except ImportError:
            pass
    if os.environ.get("DUMP_AFTER"):  # a run that may hang: every thread's stack to stderr after N seconds
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["DUMP_AFTER"]), repeat=False)
    mode = sys.argv[1]
    if mode == "single":
        single()
    else:
        distributed(mode)


if __name__ == "__main__":
    main()
