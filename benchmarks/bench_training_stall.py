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
  (f) the WHOLE COST per export (issue 18): (sum of every iteration's time with the hooks - the
      same sum without them) / number of exports, same iterations, seed and process. The first
      max(1, EVERY//4) iterations (warm-up) are left out of both sums, and CheckpointHook's own save
      (stamped around it, 4-22 s and disk-bound: it varies by seconds between runs) is taken out of
      every checkpoint iteration in every mode ("whole_cost_per_export_s"; with it left in:
      "whole_cost_raw_per_export_s"). The wait at the end of training for the last export is added
      to the mode's sum. "whole_cost_noise_s" is the sd of an ordinary iteration in "none" times
      sqrt(iterations) / exports: a whole cost below it is not distinguishable from zero;
  (g) the slowdown of the iterations that overlap a background export: their mean time over the
      mean of the same iteration indices in "none", minus 1, in percent. An export runs from the
      hook's start (the "started in the background" log line minus its pause) to its "exported
      ... in the background" log line, stamped as each line is logged; checkpoint iterations are
      not counted (their cost is the pause);
  (h) the bytes the second export wrote and hard-linked, against the frozen share of the snapshot
      (tensors of role "frozen" in its manifest): LORA=attn (LoRA on attention only, no
      modules_to_save) leaves most of the model frozen; LORA=all (default) only the norms.
Prints one JSON line per measurement, a table of ratios against (b) and (c), and a table of the
issue 18 figures next to their targets (whole cost <= 0.3 s per export at 7.6B, overlapping
iterations <= 5 % slower, paused <= 0.3 s, second export writes <= 55 % of its bytes when >= 50 %
of them are frozen).

Environment: SIZES, PROBE (sizes for the idle-GPU probe), EVERY (checkpoint interval, default per
size: 4 tiny, 40 at 0.5b/1.5b, 50 at 7b), CHECKPOINTS (default 3), ITERS (iterations per run,
default EVERY*(CHECKPOINTS+1)-1: the last EVERY-1 iterations let the last export finish; no
checkpoint at the last iteration), LORA (all|attn), ANCHORS=0 (skip (b) and (c)), MAX_SHARD
(HFExportHook's max_shard_size; its
default, 4MB for tiny so that the frozen tensors get shards of their own), SEQ (tokens per
sample, default 2048; 16 for tiny), WORK, BENCH_OUT, MODES (default none,sync,async; the tables
need all three), ASIDE (attribution runs after the modes, each against "none" of the same run:
"thread" = the export's host work in threads, not in the host process of decision 62; "nice",
"pin", "nice_pin" = the export's threads reniced to 19 and/or the training thread alone on core 0;
"hog_in", "hog_out" = no export, but HOG_S seconds (8) of the export's hashing of a HOG_GIB (2)
buffer plus one write of it after each checkpoint, in a thread / in a process of its own);
"no_ring" = the host process, but the export's thread skips the copy into its shared buffer (the
process writes stale bytes, digests of what it wrote); "no_d2h" = that, and the export's threads also
skip the copies to the host (the merge and the statistics still run on the GPU). Both write wrong
bytes on purpose: attribution only, never a snapshot to keep.
Every train row also has "cpu_s": each iteration's CPU part (from its start to the end of
train_step's launches, before any sync), to tell a slower CPU from a slower GPU.

  SIZES=0.5b,1.5b,7b python benchmarks/bench_training_stall.py     # GPU; BENCH_OUT=results dir
  SIZES=7b ANCHORS=0 EVERY=50 ITERS=199 python benchmarks/bench_training_stall.py   # issue 18 figures
  SIZES=7b ANCHORS=0 LORA=attn EVERY=50 ITERS=199 python benchmarks/bench_training_stall.py  # hard links
  SIZES=tiny python benchmarks/bench_training_stall.py             # CPU smoke run (CI); no timing claims
  python benchmarks/bench_training_stall.py --plot results.jsonl out.png
"""
from __future__ import annotations

import contextlib
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
from bench_common import PeakRSS, pyplot, qwen2_config, second_export, snapshot_roles  # noqa: E402

OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")
WORK = Path(os.environ.get("WORK", "/tmp/bench_stall"))
CUDA = torch.cuda.is_available()
# iterations between checkpoints: long enough for a background export to finish in between
EVERY = {"tiny": 4, "0.5b": 40, "1.5b": 40, "7b": 50}
SEQ = {"tiny": 16}
CHECKPOINTS = int(os.environ.get("CHECKPOINTS", "3"))
LORA = os.environ.get("LORA", "all")  # "all": every linear + modules_to_save; "attn": q/k/v/o only
ANCHORS = os.environ.get("ANCHORS", "1") != "0"
MODES = [m for m in os.environ.get("MODES", "none,sync,async").split(",") if m]
# attribution runs (issue 18, item 3): the background export again, with its threads reniced ("nice"), or the
# training thread given a core of its own ("pin"), or both ("nice_pin"); each against "none"
ASIDE = [a for a in os.environ.get("ASIDE", "").split(",") if a]
TARGETS = {"whole_cost_s": 0.3, "overlap_slowdown_pct": 5.0, "paused_s": 0.3, "second_written_pct": 55.0,
           "frozen_pct_min": 50.0}


def every_of(size: str) -> int:
    return int(os.environ.get("EVERY", EVERY[size]))


def iters_of(size: str) -> int:
    return int(os.environ.get("ITERS", every_of(size) * (CHECKPOINTS + 1) - 1))


def seq_of(size: str) -> int:
    return int(os.environ.get("SEQ", SEQ.get(size, 2048)))
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
    if LORA not in ("all", "attn"):
        raise SystemExit(f"LORA must be 'all' or 'attn', got {LORA!r}")
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    pm = get_peft_model(model, LoraConfig(
        r=64 if size != "tiny" else 8, lora_alpha=128, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=attn + ["gate_proj", "up_proj", "down_proj"] if LORA == "all" else attn,
        modules_to_save=["embed_tokens", "lm_head"] if LORA == "all" else None))

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
            self.launched: list[float] = []  # the CPU is done with train_step (no sync yet: the GPU may lag)

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            sync()
            self.stamps.append(time.perf_counter())

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self.launched.append(time.perf_counter())  # first of all hooks: before RuntimeInfoHook's .item()

        def after_train(self, runner) -> None:  # before HFExportHook waits for its last export
            sync()
            self.stamps.append(time.perf_counter())

    return IterStamps()


def _hog_hook(hog: Hog, every: int):
    from mmengine.hooks import Hook

    class HogTrigger(Hook):
        priority = "LOWEST"

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            if (runner.iter + 1) % every == 0 and runner.iter + 1 < runner.max_iters:
                hog.trigger()

    return HogTrigger()


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

    class EndStamp(Hook):  # after HFExportHook's after_train (same priority, registered after it)
        priority = 100

        def after_train(self, runner) -> None:
            sync()
            stamps.setdefault("end", {})[0] = time.perf_counter()

    return stamps, [make(65, 0), make(80, 1), make(95, 2), make(100, 3), EndStamp()]


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
        self.skipped: list[str] = []
        self.windows: dict[int, list[float]] = {}  # iter -> [start, end] of its export (perf_counter)

    def emit(self, record) -> None:
        msg = record.getMessage()
        now = time.perf_counter()
        if m := self.EXPORTED.search(msg):
            self.exports[int(m.group(1))] = {"s": float(m.group(2)), "written": int(m.group(3)),
                                             "linked": int(m.group(4))}
            self.windows.setdefault(int(m.group(1)), [now - float(m.group(2)), now])[1] = now
        elif m := self.PAUSED.search(msg):
            self.paused[int(m.group(1))] = float(m.group(2))
            start = now - float(m.group(2))  # the line follows the pause; the thread may have ended already
            self.windows.setdefault(int(m.group(1)), [start, float("inf")])[0] = start
        elif m := self.WAITED.search(msg):
            self.waited.append(float(m.group(1)))
        elif "SKIPPED" in msg:
            self.skipped.append(msg)
        if record.levelno >= logging.ERROR:
            self.errors.append(msg)


def _aside(kind: str, stop) -> None:
    """Bench-only attribution: renice (19) and/or move off core 0 every sa2va_hooks thread as it
    appears (polled every 10 ms), core 0 left to the training thread with "pin"."""
    import threading
    seen: set[int] = set()
    others = set(range(1, os.cpu_count() or 2))
    while not stop.wait(0.01):
        for t in threading.enumerate():
            if t.name.startswith("sa2va_hooks") and t.native_id and t.native_id not in seen:
                seen.add(t.native_id)
                with contextlib.suppress(OSError):  # the thread may have ended meanwhile
                    if "nice" in kind:
                        os.setpriority(os.PRIO_PROCESS, t.native_id, 19)
                    if "pin" in kind:
                        os.sched_setaffinity(t.native_id, others)


HOG_S, HOG_GIB = float(os.environ.get("HOG_S", "8")), float(os.environ.get("HOG_GIB", "2"))


def _hog_loop(requests, replies, path: str) -> None:
    """Export-like host work without an export: hash a buffer with the export's digest pool and write it
    once, for HOG_S seconds per request. Runs as a thread of the training process ("hog_in") or in a
    process of its own ("hog_out"): the same work with and without a shared GIL."""
    from sa2va_hooks.core.fingerprint import digest_tensor
    buf = torch.ones(int(HOG_GIB * 2**30), dtype=torch.uint8)
    replies.put(0.0)  # ready
    while (seconds := requests.get()) is not None:
        t0, wrote = time.perf_counter(), False
        while time.perf_counter() - t0 < seconds:
            digest_tensor("hog", buf)
            if not wrote:
                with open(path, "wb") as f:
                    f.write(buf.numpy().data)
                    os.fsync(f.fileno())
                wrote = True
        replies.put(seconds)


class Hog:
    """Starts the hog loop before training; each checkpoint iteration triggers HOG_S seconds of it;
    ``windows`` holds (start, end) of each, as the export windows do."""

    def __init__(self, kind: str, path: Path) -> None:
        import multiprocessing
        import queue
        import threading
        if kind == "hog_out":
            ctx = multiprocessing.get_context("spawn")
            self.requests, self.replies = ctx.Queue(), ctx.Queue()
            self.worker = ctx.Process(target=_hog_loop, args=(self.requests, self.replies, str(path)), daemon=True)
        else:
            self.requests, self.replies = queue.Queue(), queue.Queue()
            self.worker = threading.Thread(target=_hog_loop, args=(self.requests, self.replies, str(path)),
                                           daemon=True)
        self.worker.start()
        self.windows: list[list[float]] = []
        self.replies.get()  # the worker is ready (a process has imported torch and sa2va_hooks)
        self.waiter = threading.Thread(target=self._ends, daemon=True)
        self.waiter.start()

    def _ends(self) -> None:
        while self.replies.get() is not None:  # requests are served in order: the first open window ended
            next(w for w in self.windows if w[1] == float("inf"))[1] = time.perf_counter()

    def trigger(self) -> None:
        self.windows.append([time.perf_counter(), float("inf")])
        self.requests.put(HOG_S)

    def drain(self) -> None:
        """Wait for the last window to end (as the hook waits for its last export at the end)."""
        while any(w[1] == float("inf") for w in self.windows):
            time.sleep(0.01)

    def close(self) -> None:
        self.requests.put(None)
        self.replies.put(None)


def _skip_copies(aside: str) -> contextlib.ExitStack:
    """Bench-only attribution ("no_ring", "no_d2h"): take a copy out of the export's threads, to see
    what it costs training. The training thread (the checkpoint's fingerprints) keeps every copy."""
    import threading
    from unittest import mock
    from sa2va_hooks.core import host as host_mod
    from sa2va_hooks.core.host_process import HostProcess
    stack = contextlib.ExitStack()
    if aside not in ("no_ring", "no_d2h"):
        return stack
    os.environ["SA2VA_HOOKS_HOST_PROCESS"] = "1"

    def put(self, t):
        flat_n = t.numel() * t.element_size()
        self.ensure_ring(flat_n)
        return flat_n, t.dtype, tuple(t.shape)
    stack.enter_context(mock.patch.object(HostProcess, "put", put))
    if aside == "no_d2h":
        to_host = host_mod.HostStager.to_host

        def no_copy(self, t):
            if t.device.type != "cuda" or threading.current_thread() is threading.main_thread():
                return to_host(self, t)
            nbytes = t.numel() * t.element_size()
            return self._buffer(max(nbytes, 1))[:nbytes].view(t.dtype).view(t.shape)
        stack.enter_context(mock.patch.object(host_mod.HostStager, "to_host", no_copy))
    return stack


def train(model, size: str, mode: str, aside: str = "") -> dict:
    import threading
    stop = threading.Event()
    watcher = threading.Thread(target=_aside, args=(aside, stop), daemon=True)
    everything = os.sched_getaffinity(0)
    if aside:
        if "pin" in aside:
            os.sched_setaffinity(0, {0})
        watcher.start()
    hog = Hog(aside, WORK / "hog.bin") if aside.startswith("hog") else None
    if aside == "thread":  # the export's host work in threads of this process, as before decision 62
        os.environ["SA2VA_HOOKS_HOST_PROCESS"] = "0"
    try:
        with _skip_copies(aside):
            return _train(model, size, "none" if hog else mode, hog)
    finally:
        if hog:
            hog.close()
        stop.set()
        os.sched_setaffinity(0, everything)
        os.environ.pop("SA2VA_HOOKS_HOST_PROCESS", None)


def _train(model, size: str, mode: str, hog: Hog | None = None) -> dict:
    from mmengine.runner import Runner
    import sa2va_hooks  # noqa: F401 - registers the hooks

    every, iters = every_of(size), iters_of(size)
    work = WORK / f"{size}_{mode}"
    shutil.rmtree(work, ignore_errors=True)
    shard = os.environ.get("MAX_SHARD") or ("4MB" if size == "tiny" else None)  # tiny: frozen shards of their own
    extra = {"max_shard_size": shard} if shard else {}
    hooks = {"none": [],
             "sync": [dict(type="FingerprintHook"),
                      dict(type="HFExportHook", dtype="bf16", keep_last=1, background=False, **extra)],
             "async": [dict(type="FingerprintHook"),
                       dict(type="HFExportHook", dtype="bf16", keep_last=1, **extra)]}[mode]
    timer = _timer_hook()
    stamps, stamp_hooks = _stamp_hooks()
    runner = Runner(
        model=model, work_dir=str(work), experiment_name=f"stall_{size}_{mode}_{uuid.uuid4().hex[:6]}",
        train_dataloader=dict(dataset=RandomTokens(qwen2_config(size).vocab_size, seq_of(size)),
                              sampler=dict(type="DefaultSampler", shuffle=False), batch_size=1, num_workers=0,
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=10**9),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-5)),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=every, by_epoch=False, max_keep_ckpts=1,
                                           save_last=False),
                           logger=dict(type="LoggerHook", interval=every)),
        custom_hooks=hooks + [timer] + stamp_hooks + ([_hog_hook(hog, every)] if hog else []),
        randomness=dict(seed=0), log_level="WARNING",
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
    # the CPU's share of each iteration: from its start to the end of train_step's launches (the GIL and
    # the CPU show here; a slower GPU shows only in the iteration's time)
    cpu = [b - a for a, b in zip(timer.stamps, timer.launched, strict=False)]
    ckpt = [i for i in range(len(times)) if (i + 1) % every == 0]
    after = [i for c in ckpt for i in range(c + 1, min(c + 1 + every // 2, len(times)))]
    normal = [i for i in range(every // 4, len(times)) if i not in ckpt and i not in after]
    ours = [stamps[i][1] - stamps[i][0] + stamps[i][3] - stamps[i][2] for i in ckpt]
    fingerprint = [stamps[i][1] - stamps[i][0] for i in ckpt]
    saving = [stamps[i][2] - stamps[i][1] for i in ckpt]
    snap = work / "hf"
    sizes = [p.stat().st_size for p in snap.rglob("*") if p.is_file()] if snap.is_dir() else []
    snaps = sorted(snap.glob("iter_*"), key=lambda p: int(p.name.split("_")[1])) if snap.is_dir() else []
    roles = snapshot_roles(snaps[-1]) if snaps else None
    shutil.rmtree(work, ignore_errors=True)
    # iterations that overlap a background export (its window from the hook's log lines), not a checkpoint's
    bounds = timer.stamps
    if hog:
        hog.drain()
    for k, w in enumerate(hog.windows if hog else []):
        collect.windows[f"hog{k}"] = w
        collect.exports[f"hog{k}"] = {"s": round(w[1] - w[0], 2), "written": 0, "linked": 0}
    overlap = sorted({i for w in collect.windows.values() for i in range(len(times))
                      if i not in ckpt and bounds[i] < w[1] and bounds[i + 1] > w[0]})
    end_wait = stamps.get("end", {}).get(0, bounds[-1]) - bounds[-1]
    return {"mode": mode, "every": every, "iters": iters, "seq": seq_of(size), "lora": LORA,
            "iter_s": [round(x, 4) for x in times], "cpu_s": [round(x, 4) for x in cpu], "ckpt_idx": ckpt,
            "ckpt_save_all_s": [round(stamps[i][2] - stamps[i][1], 4) for i in ckpt],
            "overlap_idx": overlap, "end_wait_s": round(end_wait, 3), "skipped": collect.skipped,
            "snapshot_roles": roles,
            "total_s": round(total, 2), "ckpt_iter_s": [round(times[i], 3) for i in ckpt],
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
    log("model", size=size, params_b=round(params / 1e9, 3), trainable_gib=round(trainable / 2**30, 3), lora=LORA,
        every=every_of(size), iters=iters_of(size), seq=seq_of(size), exports_expected=iters_of(size) // every_of(size))
    runs = {}
    for mode in MODES:
        runs[mode] = log("train", size=size, **train(model, size, mode))
    for kind in ASIDE:
        r = train(model, size, "async", aside=kind)
        log("aside", size=size, aside=kind, iter_s=r["iter_s"], cpu_s=r["cpu_s"], paused_s=r["paused_s"],
            exports=r["exports"], extra_rss_gib=round(r["extra_rss_gib"] - runs["none"]["extra_rss_gib"], 3),
            extra_gpu_gib=(round(r["gpu_peak_gib"] - runs["none"]["gpu_peak_gib"], 2)
                           if r["gpu_peak_gib"] is not None else None),
            **issue18(runs["none"], r))
    if not {"sync", "async"} & set(runs):
        return {}
    nbytes = runs.get("async", runs.get("sync", {})).get("snapshot_bytes", 0)
    if ANCHORS:
        floor = log("disk_floor", size=size, gib=round(nbytes / 2**30, 3), s=round(disk_floor(nbytes), 2))
        peft = log("peft_merge_and_unload_save_pretrained", size=size, **peft_merge_save(model))
    else:  # ANCHORS=0: the issue 18 figures only
        floor, peft = {"s": None}, {"s": None}
    return summarize(size, params, nbytes, runs, floor, peft)


def summarize(size: str, params: int, nbytes: int, runs: dict, floor: dict, peft: dict) -> dict:
    base = statistics.mean(runs["none"]["ckpt_iter_s"])
    row = {"size": size, "params_b": round(params / 1e9, 3), "snapshot_gib": round(nbytes / 2**30, 3),
           "disk_floor_s": floor["s"], "peft_s": peft["s"]}
    for mode in [m for m in ("sync", "async") if m in runs]:
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
        row[mode].update(issue18(runs["none"], r))
    if "sync" in row and "async" in row:
        sync_export = statistics.mean(row["sync"]["export_s"] or [float("nan")])
        row["async"]["stall_vs_sync_export"] = round(row["async"]["in_loop_mean_s"] / sync_export, 4)
        async_export = statistics.mean(row["async"]["export_s"] or [float("nan")])
        row["async"]["export_vs_floor"] = round(async_export / floor["s"], 3) if floor["s"] else None
        row["async"]["export_vs_peft"] = round(async_export / peft["s"], 3) if peft["s"] else None
        row["sync"]["export_vs_floor"] = round(sync_export / floor["s"], 3) if floor["s"] else None
    row["lora"], row["every"], row["iters"], row["seq"] = LORA, r["every"], r["iters"], r["seq"]
    roles = [runs[m]["snapshot_roles"] for m in ("async", "sync") if m in runs and runs[m]["snapshot_roles"]]
    row["frozen_pct"] = roles[0].get("frozen_pct") if roles else None
    row["targets"] = TARGETS
    return log("summary", **row)


def issue18(none: dict, r: dict) -> dict:
    """Issue 18's figures of one mode against "none": the whole cost per export, the slowdown of
    the iterations that overlap a background export, the pause, the second export's bytes."""
    n, every = len(r["iter_s"]), r["every"]
    warm = max(1, every // 4)
    save_r = dict(zip(r["ckpt_idx"], r["ckpt_save_all_s"], strict=False))
    save_n = dict(zip(none["ckpt_idx"], none["ckpt_save_all_s"], strict=False))
    idx = range(warm, min(n, len(none["iter_s"])))
    raw = sum(r["iter_s"][i] for i in idx) + r["end_wait_s"] - sum(none["iter_s"][i] for i in idx) - none["end_wait_s"]
    saves = sum(save_r.get(i, 0.0) for i in idx) - sum(save_n.get(i, 0.0) for i in idx)
    exports = max(len(r["exports"]), 1)
    ordinary = [none["iter_s"][i] for i in idx if i not in save_n]
    noise = statistics.stdev(ordinary) * len(idx) ** 0.5 / exports if len(ordinary) > 1 else None
    ov = [i for i in r["overlap_idx"] if i < len(none["iter_s"])]
    slowdown = (100 * (statistics.mean(r["iter_s"][i] for i in ov) / statistics.mean(none["iter_s"][i] for i in ov) - 1)
                if ov else None)
    exports_list = [r["exports"][k] for k in sorted(r["exports"], key=lambda k: int(k.lstrip("hog")))]
    cpu_ov = ([round(statistics.mean(x["cpu_s"][i] for i in ov), 4) for x in (r, none)]
              if ov and "cpu_s" in r else None)
    return {"exports_done": len(r["exports"]), "skipped": len(r["skipped"]), "warmup_iters_left_out": warm,
            "whole_cost_per_export_s": round((raw - saves) / exports, 3),
            "whole_cost_raw_per_export_s": round(raw / exports, 3),
            "whole_cost_noise_s": round(noise, 3) if noise is not None else None,
            "end_wait_s": r["end_wait_s"], "overlap_iters": len(ov),
            "overlap_slowdown_pct": round(slowdown, 2) if slowdown is not None else None,
            "overlap_cpu_s_vs_none": cpu_ov,
            "paused_max_s": max(r["in_loop_hooks_s"]) if r["in_loop_hooks_s"] else None,
            "second_export": second_export(exports_list)}


def verdict(value, target: float, le: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{value} ({'met' if (value <= target if le else value >= target) else 'MISSED'})"


def targets_table(rows: list[dict]) -> str:
    t = TARGETS
    lines = [f"issue 18 targets: whole cost <= {t['whole_cost_s']} s/export at 7.6B; iterations overlapping a "
             "background "
             f"export <= {t['overlap_slowdown_pct']} % slower; paused <= {t['paused_s']} s (max over exports, "
             f"FingerprintHook + HFExportHook in the loop); second export writes <= {t['second_written_pct']} % of its "
             f"bytes when >= {t['frozen_pct_min']} % are frozen",
             "| size | LoRA | mode | exports | whole cost s/export (noise; with saves) | overlapping iters | "
             "overlap slowdown % | paused s: in loop max (hook log) | 2nd export written % (written / linked B) | "
             "frozen % | extra RSS GiB | extra GPU GiB |", "|" + "---|" * 12]
    for r in rows:
        for mode in ("sync", "async"):
            m = r[mode]
            sec = m["second_export"]
            written = (verdict(sec["written_pct"], t["second_written_pct"]) if sec and r["frozen_pct"] is not None
                       and r["frozen_pct"] >= t["frozen_pct_min"] else (sec["written_pct"] if sec else None))
            hook_paused = max(m["paused_s"]) if m["paused_s"] else None
            lines.append(
                f"| {r['size']} | {r['lora']} | {mode} | {m['exports_done']} (skipped {m['skipped']}) | "
                f"{verdict(m['whole_cost_per_export_s'], t['whole_cost_s'])} ({m['whole_cost_noise_s']}; "
                f"{m['whole_cost_raw_per_export_s']}) | {m['overlap_iters']} | "
                f"{verdict(m['overlap_slowdown_pct'], t['overlap_slowdown_pct'])} | "
                f"{verdict(m['paused_max_s'], t['paused_s'])} ({hook_paused}) | {written} "
                f"({sec['written'] if sec else None} / {sec['linked'] if sec else None}) | {r['frozen_pct']} | "
                f"{m['extra_rss_gib']} | {m['extra_gpu_gib']} |")
    return "\n".join(lines)


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
    plt = pyplot()
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
    for key, style, label in (("disk_floor_s", "o--", "disk floor (write+fsync)"),
                              ("peft_s", "o:", "PEFT merge+save_pretrained")):
        anchored = [r for r in rows if r[key]]  # ANCHORS=0 runs have none
        if anchored:
            ax2.plot([r["params_b"] for r in anchored], [r["snapshot_gib"] / r[key] for r in anchored], style,
                     label=label)
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
    if {"none", "sync", "async"} <= set(MODES):
        print(table(rows), flush=True)
        print(targets_table(rows), flush=True)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
