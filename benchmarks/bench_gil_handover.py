"""Benchmark: what a background thread's torch calls cost a launch-bound training loop through the GIL
(issue 18, item 3: why the iterations that overlap an export are slower, on any machine).

A "training" loop in the main thread makes many small torch calls (each releases the GIL and takes it
back, as a GPU training step's launches do). Beside it, a side worker makes RATE torch calls per
second (small, like the export thread's merge, check and statistics calls), either as a thread of this
process (it shares the GIL) or in a process of its own (it does not). Printed per rate: the loop's time
against the same loop alone in the same run, for both. The side work is paced, so both sides do the
same work at the same rate; only the GIL differs.

    python benchmarks/bench_gil_handover.py            # RATES=0,1000,3000,10000 LOOPS=... CALLS=...

Output: one JSON line per (rate, where) and a table. CPU only; no claim about a GPU's absolute figures,
only the mechanism: the slowdown grows with the side's call rate in a thread, and not in a process.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import threading
import time

import torch

RATES = [int(r) for r in os.environ.get("RATES", "0,1000,3000,10000").split(",")]
CALLS = int(os.environ.get("CALLS", "2000"))  # torch calls per "iteration" of the loop
LOOPS = int(os.environ.get("LOOPS", "40"))  # iterations measured per rate
REPEATS = int(os.environ.get("REPEATS", "3"))


def loop_once(x: torch.Tensor) -> float:
    t = time.perf_counter()
    for _ in range(CALLS):
        x = torch.add(x, 1.0)  # a small op: the GIL is released and taken back, as at every launch
    return time.perf_counter() - t


def side_work(rate: int, stop, ready) -> None:
    """RATE small torch calls per second, in bursts every millisecond, until ``stop`` is set;
    ``ready`` is set once it runs (a spawned process has imported torch by then)."""
    y = torch.ones(256)
    ready.set()
    per_ms = rate / 1000.0
    done, t0 = 0.0, time.perf_counter()
    while not stop.is_set():
        due = (time.perf_counter() - t0) * rate
        while done < due:
            y = torch.mul(y, 1.0)
            done += 1
        time.sleep(0.001 if per_ms < 50 else 0.0)


def measure(rate: int, where: str) -> float:
    x = torch.zeros(64)
    for _ in range(3):
        loop_once(x)  # warm up
    if rate == 0:
        return statistics.median(loop_once(x) for _ in range(LOOPS))
    if where == "thread":
        stop, ready = threading.Event(), threading.Event()
        worker = threading.Thread(target=side_work, args=(rate, stop, ready), daemon=True)
    else:
        ctx = multiprocessing.get_context("spawn")
        stop, ready = ctx.Event(), ctx.Event()
        worker = ctx.Process(target=side_work, args=(rate, stop, ready), daemon=True)
    worker.start()
    try:
        ready.wait()  # the side work runs before the loop is timed
        return statistics.median(loop_once(x) for _ in range(LOOPS))
    finally:
        stop.set()
        worker.join()


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for repeat in range(REPEATS):
        alone = measure(0, "alone")
        for rate in RATES[1:] if RATES and RATES[0] == 0 else RATES:
            for where in ("thread", "process"):
                s = measure(rate, where)
                row = {"repeat": repeat, "rate_per_s": rate, "where": where, "loop_s": round(s, 5),
                       "alone_s": round(alone, 5), "slowdown_pct": round(100 * (s / alone - 1), 2),
                       "calls_per_loop": CALLS, "cores": os.cpu_count()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\nside calls/s | in a thread: loop slowdown % (median of repeats) | in a process")
    for rate in sorted({r["rate_per_s"] for r in rows}):
        med = {w: statistics.median(r["slowdown_pct"] for r in rows if r["rate_per_s"] == rate and r["where"] == w)
               for w in ("thread", "process")}
        print(f"{rate:>12} | {med['thread']:>8.2f} | {med['process']:>8.2f}")


if __name__ == "__main__":
    main()
