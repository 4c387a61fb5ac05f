"""Benchmark: how long does training stall per export, in a real mmengine training loop?

For Qwen2-shaped models (LoRA r=64 on every linear layer plus modules_to_save embed_tokens and
lm_head, bf16, on one GPU), all in one process and side by side:
  (a) a short mmengine Runner training on synthetic tokens, CheckpointHook every EVERY
      iterations (trainable state + optimizer, as xtuner saves it), three times:
        none   no sa2va_hooks hook
        sync   FingerprintHook + HFExportHook(background=False, dtype="bf16", keep_last=1)
        async  FingerprintHook + HFExportHook(dtype="bf16", keep_last=1)   (the default: background)
      Iteration times come from the loop itself (a hook stamps every iteration, with a CUDA
      synchronize). stall per export = mean time of a checkpoint iteration in the mode minus that
      in "none". "after" = the iterations that follow a checkpoint while a background export
      runs, against the same iterations in "none" (the export's interference);
  (b) PEFT merge_and_unload() + save_pretrained() of the same weights (last: it mutates them);
  (c) the disk floor: the snapshot's byte count written with fsync, same disk;
  (d) bytes written and hard-linked by each export (from the hook's log line);
  (e) peak extra resident memory and peak extra GPU memory of each mode over "none".
Prints one JSON line per measurement and a table of ratios against (b) and (c).

  SIZES=0.5b,1.5b,7b python benchmarks/bench_training_stall.py     # GPU; BENCH_OUT=results dir
  SIZES=tiny python benchmarks/bench_training_stall.py             # CPU smoke run (CI); no timing claims
  python benchmarks/bench_training_stall.py --plot results.jsonl out.png
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PeakRSS, qwen2_config  # noqa: E402

OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")
WORK = Path(os.environ.get("WORK", "/tmp/bench_stall"))
CUDA = torch.cuda.is_available()
# iterations between checkpoints: long enough for a background export to finish in between
EVERY = {"tiny": 4, "0.5b": 40, "1.5b": 40, "7b": 50}
SEQ = {"tiny": 16}
CHECKPOINTS = int(os.environ.get("CHECKPOINTS", "3"))
T0 = time.time()


def log(step: str, **kw) -> dict:
    kw = {"step": step, **kw, "t": round(time.time() - T0, 1)}
    line = json.dumps(kw)
    print(line, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "bench_training_stall.jsonl", "a") as f:
        f.write(line + "\n")
    return kw


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


# -- the training side: a real mmengine Runner around a PEFT model ------------------------------
def build(size: str):
    from mmengine.model import BaseModel
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if CUDA else torch.float32)
    with torch.device("cuda" if CUDA else "cpu"):
        model = Qwen2ForCausalLM(qwen2_config(size))
    torch.set_default_dtype(torch.float32)
    pm = get_peft_model(model, LoraConfig(
        r=64 if size != "tiny" else 8, lora_alpha=128, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["embed_tokens", "lm_head"]))

    class CausalLM(BaseModel):
        """What xtuner's SupervisedFinetune is to the Runner: loss in forward, and a state dict of
        the trainable tensors only (the checkpoint holds what training changes)."""

        def __init__(self, llm) -> None:
            super().__init__()
            self.llm = llm

        def init_weights(self) -> None:  # built with its weights; nothing to initialise
            pass

        def forward(self, input_ids, mode="loss"):
            return {"loss": self.llm(input_ids=input_ids, labels=input_ids).loss}

        def state_dict(self, *args, **kwargs):
            from collections import OrderedDict
            full = super().state_dict(*args, **kwargs)
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            out = OrderedDict((k, v) for k, v in full.items() if k in trainable)
            out._metadata = getattr(full, "_metadata", None)
            return out

    return CausalLM(pm)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int) -> None:
        self.vocab, self.seq = vocab, seq

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, self.vocab, (self.seq,), generator=g)}


def _timer_hook():
    from mmengine.hooks import Hook

    class IterStamps(Hook):
        priority = "HIGHEST"

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            sync()
            self.stamps.append(time.perf_counter())

        def after_train(self, runner) -> None:  # before HFExportHook waits for its last export
            sync()
            self.stamps.append(time.perf_counter())

    return IterStamps()


def _stamp_hooks():
    """Four stamps in every after_train_iter, around our hooks: before FingerprintHook (LOW, 70),
    between it and CheckpointHook (VERY_LOW, 90), between CheckpointHook and HFExportHook
    (LOWEST, 100), and after HFExportHook (registered after it at the same priority). So the
    time our hooks hold the training loop is measured inside the loop itself."""
    from mmengine.hooks import Hook

    stamps: dict[int, dict[int, float]] = {}

    def make(prio: int, slot: int):
        class Stamp(Hook):
            priority = prio

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
                sync()
                stamps.setdefault(runner.iter, {})[slot] = time.perf_counter()

        return Stamp()

    return stamps, [make(65, 0), make(80, 1), make(95, 2), make(100, 3)]


class Collect(logging.Handler):
    """The hook's own log lines: export time, the pause, bytes written and linked."""

    EXPORTED = re.compile(r"exported iter (\d+) .*? in (?:the background in )?([\d.]+)s.*?\((\d+) written, (\d+) "
                          r"hard-linked")
    PAUSED = re.compile(r"export of iter (\d+) .* training paused ([\d.]+)s")
    WAITED = re.compile(r"waited ([\d.]+)s for the background export")

    def __init__(self) -> None:
        super().__init__()
        self.exports: dict[int, dict] = {}
        self.paused: dict[int, float] = {}
        self.waited: list[float] = []
        self.errors: list[str] = []

    def emit(self, record) -> None:
        msg = record.getMessage()
        if m := self.EXPORTED.search(msg):
            self.exports[int(m.group(1))] = {"s": float(m.group(2)), "written": int(m.group(3)),
                                             "linked": int(m.group(4))}
        elif m := self.PAUSED.search(msg):
            self.paused[int(m.group(1))] = float(m.group(2))
        elif m := self.WAITED.search(msg):
            self.waited.append(float(m.group(1)))
        if record.levelno >= logging.ERROR:
            self.errors.append(msg)


def train(model, size: str, mode: str) -> dict:
    from mmengine.runner import Runner
    import sa2va_hooks  # noqa: F401 - registers the hooks

    every = int(os.environ.get("EVERY", EVERY[size]))
    iters = every * CHECKPOINTS
    work = WORK / f"{size}_{mode}"
    shutil.rmtree(work, ignore_errors=True)
    hooks = {"none": [],
             "sync": [dict(type="FingerprintHook"),
                      dict(type="HFExportHook", dtype="bf16", keep_last=1, background=False)],
             "async": [dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="bf16", keep_last=1)]}[mode]
    timer = _timer_hook()
    stamps, stamp_hooks = _stamp_hooks()
    runner = Runner(
        model=model, work_dir=str(work), experiment_name=f"stall_{size}_{mode}_{uuid.uuid4().hex[:6]}",
        train_dataloader=dict(dataset=RandomTokens(qwen2_config(size).vocab_size, SEQ.get(size, 2048)),
                              sampler=dict(type="DefaultSampler", shuffle=False), batch_size=1, num_workers=0,
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=10**9),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-5)),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=every, by_epoch=False, max_keep_ckpts=1),
                           logger=dict(type="LoggerHook", interval=every)),
        custom_hooks=hooks + [timer] + stamp_hooks, randomness=dict(seed=0), log_level="WARNING",
        env_cfg=dict(dist_cfg=dict(backend="nccl")))
    collect = Collect()
    runner.logger.addHandler(collect)
    runner.logger.setLevel(logging.INFO)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t = time.perf_counter()
        runner.train()
        total = time.perf_counter() - t
    runner.logger.removeHandler(collect)
    times = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
    ckpt = [i for i in range(len(times)) if (i + 1) % every == 0]
    after = [i for c in ckpt for i in range(c + 1, min(c + 1 + every // 2, len(times)))]
    normal = [i for i in range(every // 4, len(times)) if i not in ckpt and i not in after]
    ours = [stamps[i][1] - stamps[i][0] + stamps[i][3] - stamps[i][2] for i in ckpt]
    fingerprint = [stamps[i][1] - stamps[i][0] for i in ckpt]
    saving = [stamps[i][2] - stamps[i][1] for i in ckpt]
    snap = work / "hf"
    sizes = [p.stat().st_size for p in snap.rglob("*") if p.is_file()] if snap.is_dir() else []
    shutil.rmtree(work, ignore_errors=True)
    return {"mode": mode, "total_s": round(total, 2), "ckpt_iter_s": [round(times[i], 3) for i in ckpt],
            "in_loop_hooks_s": [round(x, 4) for x in ours], "in_loop_fingerprint_s": [round(x, 4) for x in fingerprint],
            "checkpoint_save_s": [round(x, 3) for x in saving],
            "after_iter_mean_s": round(statistics.mean(times[i] for i in after), 4),
            "normal_iter_mean_s": round(statistics.mean(times[i] for i in normal), 4),
            "exports": {str(k): v for k, v in sorted(collect.exports.items())},
            "paused_s": {str(k): v for k, v in sorted(collect.paused.items())}, "waited_s": collect.waited,
            "errors": collect.errors, "extra_rss_gib": rss.extra_gib,
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
            "snapshot_bytes": sum(sizes)}


# -- the anchors ----------------------------------------------------------------------------
def disk_floor(nbytes: int) -> float:
    """The same number of bytes, written and fsynced (the fastest any export can be)."""
    WORK.mkdir(parents=True, exist_ok=True)
    buf = os.urandom(64 << 20)
    path = WORK / "floor.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[:min(left, len(buf))])
        f.flush()
        os.fsync(f.fileno())
    s = time.perf_counter() - t
    path.unlink()
    return s


def peft_merge_save(model) -> dict:
    out = WORK / "peft"
    with PeakRSS() as rss:
        t = time.perf_counter()
        merged = model.llm.merge_and_unload()
        sync()
        merged.save_pretrained(out, max_shard_size="5GB")
        os.sync()
        s = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"s": round(s, 2), "extra_rss_gib": rss.extra_gib}


def measure(size: str) -> dict:
    if CUDA:
        torch.cuda.empty_cache()
    model = build(size)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    log("model", size=size, params_b=round(params / 1e9, 3), trainable_gib=round(trainable / 2**30, 3))
    runs = {}
    for mode in ("none", "sync", "async"):
        runs[mode] = log("train", size=size, **train(model, size, mode))
    nbytes = runs["async"]["snapshot_bytes"] or runs["sync"]["snapshot_bytes"]
    floor = log("disk_floor", size=size, gib=round(nbytes / 2**30, 3), s=round(disk_floor(nbytes), 2))
    peft = log("peft_merge_and_unload_save_pretrained", size=size, **peft_merge_save(model))
    return summarize(size, params, nbytes, runs, floor, peft)


def summarize(size: str, params: int, nbytes: int, runs: dict, floor: dict, peft: dict) -> dict:
    base = statistics.mean(runs["none"]["ckpt_iter_s"])
    row = {"size": size, "params_b": round(params / 1e9, 3), "snapshot_gib": round(nbytes / 2**30, 3),
           "disk_floor_s": floor["s"], "peft_s": peft["s"]}
    for mode in ("sync", "async"):
        r = runs[mode]
        stalls = [round(c - base, 3) for c in r["ckpt_iter_s"]]
        export_s = [e["s"] for e in r["exports"].values()]
        row[mode] = {"stall_per_export_s": stalls, "stall_mean_s": round(statistics.mean(stalls), 3),
                     "in_loop_s": r["in_loop_hooks_s"],
                     "in_loop_mean_s": round(statistics.mean(r["in_loop_hooks_s"]), 4),
                     "in_loop_fingerprint_s": r["in_loop_fingerprint_s"],
                     "export_s": export_s, "first_export_s": export_s[0] if export_s else None,
                     "repeat_export_mean_s": round(statistics.mean(export_s[1:]), 2) if len(export_s) > 1 else None,
                     "after_iter_slowdown": round(r["after_iter_mean_s"] / runs["none"]["after_iter_mean_s"], 3),
                     "normal_iter_ratio": round(r["normal_iter_mean_s"] / runs["none"]["normal_iter_mean_s"], 3),
                     "bytes_written": [e["written"] for e in r["exports"].values()],
                     "bytes_linked": [e["linked"] for e in r["exports"].values()],
                     "extra_rss_gib": round(r["extra_rss_gib"] - runs["none"]["extra_rss_gib"], 3),
                     "extra_gpu_gib": (round(r["gpu_peak_gib"] - runs["none"]["gpu_peak_gib"], 2)
                                       if r["gpu_peak_gib"] is not None else None),
                     "paused_s": list(r["paused_s"].values()), "waited_s": r["waited_s"], "errors": r["errors"]}
    sync_export = statistics.mean(row["sync"]["export_s"] or [float("nan")])
    row["async"]["stall_vs_sync_export"] = round(row["async"]["in_loop_mean_s"] / sync_export, 4)
    async_export = statistics.mean(row["async"]["export_s"] or [float("nan")])
    row["async"]["export_vs_floor"] = round(async_export / floor["s"], 3) if floor["s"] else None
    row["async"]["export_vs_peft"] = round(async_export / peft["s"], 3)
    row["sync"]["export_vs_floor"] = round(sync_export / floor["s"], 3) if floor["s"] else None
    return log("summary", **row)


def table(rows: list[dict]) -> str:
    lines = ["| size | GiB | floor s | PEFT s | sync: in-loop s (iter diff) | async: in-loop s (iter diff) | "
             "async in-loop / sync export | async export s (first, repeats) | export / floor | export / PEFT | "
             "iters after export | linked GiB (last) | extra RSS GiB | extra GPU GiB |", "|" + "---|" * 14]
    for r in rows:
        a, s = r["async"], r["sync"]
        lines.append(
            f"| {r['size']} | {r['snapshot_gib']} | {r['disk_floor_s']} | {r['peft_s']} | {s['in_loop_mean_s']} "
            f"({s['stall_mean_s']}) | {a['in_loop_mean_s']} ({a['stall_mean_s']}) | {a['stall_vs_sync_export']} | "
            f"{a['first_export_s']}, {a['repeat_export_mean_s']} | "
            f"{a['export_vs_floor']} | {a['export_vs_peft']} | x{a['after_iter_slowdown']} | "
            f"{round(a['bytes_linked'][-1] / 2**30, 3) if a['bytes_linked'] else None} | {a['extra_rss_gib']} | "
            f"{a['extra_gpu_gib']} |")
    return "\n".join(lines)


def plot(jsonl: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if '"summary"' in line]
    rows.sort(key=lambda r: r["params_b"])
    x = [r["params_b"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(x, [r["sync"]["in_loop_mean_s"] for r in rows], "o-", label="synchronous export")
    ax1.plot(x, [r["async"]["in_loop_mean_s"] for r in rows], "o-", label="background export (default)")
    ax1.set_yscale("log")
    ax1.axhline(0.5, ls="--", c="grey", label="target 0.5 s")
    ax1.set(xlabel="parameters (billions)", ylabel="training stall per export (s)", title="Stall per export")
    ax1.legend()
    ax2.plot(x, [r["snapshot_gib"] / statistics.mean(r["async"]["export_s"]) for r in rows], "o-",
             label="background export")
    ax2.plot(x, [r["snapshot_gib"] / r["disk_floor_s"] for r in rows], "o--", label="disk floor (write+fsync)")
    ax2.plot(x, [r["snapshot_gib"] / r["peft_s"] for r in rows], "o:", label="PEFT merge+save_pretrained")
    ax2.set(xlabel="parameters (billions)", ylabel="GiB/s", title="Export throughput")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def probe(size: str) -> dict:
    """Outside the loop, on an idle GPU: the capture + fingerprints that FingerprintHook does at a
    checkpoint (three times; the buffers reserved first, as the hook does), then one background
    and one synchronous export of that capture, each with its peak extra GPU and host memory."""
    from sa2va_hooks import SnapshotBuffers, export_hf, start_export
    from sa2va_hooks.core.fingerprint import FingerprintSet
    from sa2va_hooks.core.snapshot import fingerprint_capture
    from sa2va_hooks.export import reserve_staging
    model = build(size)
    reserve_staging(model, "bf16")
    buffers = SnapshotBuffers()
    buffers.prepare(model)
    times = []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        capture = buffers.capture(model, stats=True)
        trained = FingerprintSet.of(fingerprint_capture(capture))
        times.append(round(time.perf_counter() - t, 4))
    row = {"size": size, "capture_and_fingerprints_s": times, "trainable_gib": round(capture.nbytes / 2**30, 3)}
    for how in ("background", "sync"):
        out = WORK / f"probe_{how}"
        shutil.rmtree(out, ignore_errors=True)
        sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        g0 = torch.cuda.memory_allocated() if CUDA else 0
        with PeakRSS() as rss:
            t = time.perf_counter()
            if how == "background":
                start_export(model, out, dtype="bf16", capture=capture, trained=trained).result()
            else:
                export_hf(model, out, dtype="bf16", trained=trained)
            s = time.perf_counter() - t
        row[how] = {"s": round(s, 2), "extra_rss_gib": rss.extra_gib,
                    "extra_gpu_gib": round((torch.cuda.max_memory_allocated() - g0) / 2**30, 3) if CUDA else None}
        shutil.rmtree(out, ignore_errors=True)
    peaks: dict[str, float] = {}
    if CUDA:  # where the export's GPU memory goes: the peak while each tensor is produced
        from sa2va_hooks.core.observer import ExportObserver

        class PeakPerTensor(ExportObserver):  # peak above the allocation before the export
            def tensor_producing(self, entry) -> None:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

            def tensor_produced(self, entry) -> None:
                peaks[f"{entry.name} ({entry.role})"] = (torch.cuda.max_memory_allocated() - start) / 2**30

        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        export_hf(model, WORK / "probe_traced", dtype="bf16", trained=trained, observer=PeakPerTensor())
        shutil.rmtree(WORK / "probe_traced", ignore_errors=True)
        row["gpu_peak_by_tensor_gib"] = {k: round(v, 3) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])[:6]}
    largest = max(p.numel() * 2 for p in model.parameters())  # bf16 export
    row["largest_tensor_gib"] = round(largest / 2**30, 3)
    del model, buffers, capture
    if CUDA:
        torch.cuda.empty_cache()
    return log("probe", **row)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--plot":
        return plot(Path(sys.argv[2]), Path(sys.argv[3]))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
           "cpus": os.cpu_count()}
    log("env", **env)
    for size in filter(None, os.environ.get("PROBE", "").split(",")):
        probe(size)
    rows = [measure(size) for size in filter(None, os.environ.get("SIZES", "tiny").split(","))]
    print(table(rows), flush=True)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
