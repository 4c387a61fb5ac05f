"""Benchmark: how many torch calls an export makes in the thread that merges, checks and stages
(issue 18, item 3). In the hooks that thread is a thread of the training process: each of its torch
calls releases the GIL and takes it back, and a launch-bound training thread waits at each hand-over
(``bench_gil_handover.py`` shows the mechanism; docs/benchmarks.md has the GPU figures). So the count
per tensor is what this measures, by the function of ours (or PEFT's) that made the call.

    python benchmarks/bench_export_calls.py     # LORA=all|attn SIZE=tiny DTYPE=bf16

With ``OVERLAP=1`` it then measures what those calls cost a call-bound loop in the main thread (a
stand-in for a launch-bound training thread; CPU only): the loop alone, then while a thread of this
process runs back-to-back exports through a host process (as the hooks do: the hashing and writing
in a process of its own), in alternating rounds. Printed: the loop's slowdown and the extra loop time
per export, against the loop alone in the same run.

    OVERLAP=1 ROUNDS=5 CALLS=20000 python benchmarks/bench_export_calls.py

A synchronous ``export_hf`` of a Qwen2 with fresh random LoRA weights, counted with a
``TorchFunctionMode`` in the calling thread only (the mode stack is per thread: the digest worker is
not counted, as in the hooks the host process does that work). Attribute reads (``t.shape``,
``t.dtype``) go through the mode too but release nothing; they are counted apart. Output: one JSON
line and a table, calls per exported tensor by caller.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import qwen2_config  # noqa: E402

LORA = os.environ.get("LORA", "all")
SIZE = os.environ.get("SIZE", "tiny")
DTYPE = os.environ.get("DTYPE", "bf16")
_OURS = (os.sep + "sa2va_hooks" + os.sep, os.sep + "peft" + os.sep)


def _caller() -> tuple[str, bool]:
    """The innermost frame of sa2va_hooks or PEFT that led to this call, and whether it was made
    under ``produce_one`` (what the hooks' export thread does per tensor; the rest of a synchronous
    export, the fingerprints and the load check, runs at the checkpoint or in other threads)."""
    f, who = sys._getframe(2), "other"
    while f is not None:
        path = f.f_code.co_filename
        if who == "other":
            for mark in _OURS:
                if mark in path:
                    who = f"{mark.strip(os.sep)}.{Path(path).stem}.{f.f_code.co_name}"
        if f.f_code.co_name == "produce_one":
            return who, True
        f = f.f_back
    return who, False


class _Count(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.produce: collections.Counter = collections.Counter()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "__get__":
            self.reads += 1
        else:
            who, producing = _caller()
            self.calls[who] += 1
            if producing:
                self.produce[who] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    from sa2va_hooks import export_hf

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    targets += ["gate_proj", "up_proj", "down_proj"] if LORA == "all" else []
    pm = get_peft_model(Qwen2ForCausalLM(qwen2_config(SIZE)), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # fresh random adapters, as after training
    with tempfile.TemporaryDirectory() as d:
        export_hf(pm, Path(d) / "warm", dtype=DTYPE)  # imports and first-call work out of the count
        counter = _Count()
        with counter:
            manifest = export_hf(pm, Path(d) / "counted", dtype=DTYPE)
        if os.environ.get("OVERLAP") == "1":
            overlap(pm, Path(d))
    n = len(manifest.tensors)
    roles = collections.Counter(t["role"] for t in manifest.to_json()["tensors"].values())
    total, produce = sum(counter.calls.values()), sum(counter.produce.values())
    row = {"size": SIZE, "lora": LORA, "dtype": DTYPE, "tensors": n, "roles": dict(roles), "torch_calls": total,
           "per_tensor": round(total / n, 1), "produce_calls": produce, "produce_per_tensor": round(produce / n, 1),
           "attribute_reads": counter.reads, "by_caller": dict(counter.calls.most_common()),
           "produce_by_caller": dict(counter.produce.most_common()), "torch": torch.__version__}
    print(json.dumps(row))
    print(f"\n{n} tensors (roles {dict(roles)}); {counter.reads} attribute reads besides")
    print(f"whole synchronous export: {total} torch calls, {total / n:.1f} per tensor")
    print(f"under produce_one (the hooks' export thread): {produce} torch calls, {produce / n:.1f} per tensor")
    for who, c in counter.produce.most_common(20):
        print(f"  {c:6d}  {c / n:6.1f}/tensor  {who}")


def _loop(calls: int) -> float:
    """A call-bound loop (each small op releases and retakes the GIL, as a GPU training step's
    launches do): its wall time."""
    x = torch.zeros(64)
    t = time.perf_counter()
    for _ in range(calls):
        x = torch.add(x, 1.0)
    return time.perf_counter() - t


def _exporting(pm, work: Path, host, stop: threading.Event, running: threading.Event, counted: list) -> None:
    """Back-to-back exports until ``stop``, each counted as it ends."""
    from sa2va_hooks import start_export
    i = 0
    while not stop.is_set():
        running.set()
        start_export(pm, work / str(i), dtype=DTYPE, host=host).result()
        shutil.rmtree(work / str(i))
        i += 1
        counted.append(i)


def overlap(pm, work: Path) -> None:
    from sa2va_hooks import start_export
    from sa2va_hooks.export import HostProcess

    calls, rounds = int(os.environ.get("CALLS", "20000")), int(os.environ.get("ROUNDS", "5"))
    loops = int(os.environ.get("LOOPS", "100"))
    host = HostProcess()
    start_export(pm, work / "warm_host", dtype=DTYPE, host=host).result()  # the process started and warm
    alone, beside, exports = [], [], 0
    for r in range(rounds):
        alone.append(sum(_loop(calls) for _ in range(loops)))
        stop, running, counted = threading.Event(), threading.Event(), []
        side = threading.Thread(target=_exporting, args=(pm, work / f"r{r}", host, stop, running, counted))
        side.start()
        running.wait()
        n0 = len(counted)
        beside.append(sum(_loop(calls) for _ in range(loops)))
        done = len(counted) - n0  # exports that ended while the loop ran (the one in flight not counted)
        stop.set()
        side.join()
        exports += done
        print(json.dumps({"round": r, "alone_s": round(alone[-1], 4), "beside_s": round(beside[-1], 4),
                          "exports_ended": done}), flush=True)
    host.close()
    extra = sum(beside) - sum(alone)
    row = {"overlap_slowdown_pct": round(100 * extra / sum(alone), 2), "exports": exports,
           "extra_loop_s_per_export": round(extra / max(exports, 1), 4), "loop_alone_s": round(sum(alone), 3),
           "loop_beside_s": round(sum(beside), 3), "calls_per_loop": calls, "loops_per_round": loops,
           "rounds": rounds, "cores": os.cpu_count(), "torch": torch.__version__}
    print(json.dumps(row))
    print(f"\nloop beside back-to-back exports: {row['overlap_slowdown_pct']} % slower than alone; "
          f"{exports} exports ended meanwhile; extra loop time per export {row['extra_loop_s_per_export']} s")


if __name__ == "__main__":
    main()
