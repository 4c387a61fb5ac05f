"""Benchmark: tensor digest v1 (one serial xxh3 stream) against v2 (xxh3 of 16 MiB chunks, hashed on
a pool of threads), on one host tensor, as the checkpoint's fingerprinting pays it (decision 59).

For threads = 1..MAX_THREADS (default min(8, cpu_count)) it prints one JSON line: the best of REPEAT
timings of v1 and of v2 on a pool of that many threads, the throughput, and the speed-up v1/v2.
Hashing only: the bytes are already on the host (the capture copies them there first). Every v2
digest is checked equal to the 1-thread one. Env: GIB (tensor size, default 1), REPEAT (default 5),
MAX_THREADS, BENCH_OUT (results dir; appends bench_digest.jsonl).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sa2va_hooks.core.fingerprint import DIGEST_ALGORITHM, digest_tensor, digest_tensor_v1  # noqa: E402
from sa2va_hooks.core.workers import Workers  # noqa: E402

GIB = float(os.environ.get("GIB", "1"))
REPEAT = int(os.environ.get("REPEAT", "5"))
MAX_THREADS = int(os.environ.get("MAX_THREADS", str(min(8, os.cpu_count() or 1))))
OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")


def best(fn, repeat: int) -> tuple[float, str]:
    times, result = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    nbytes = int(GIB * 2**30)
    t = torch.randint(-128, 127, (nbytes,), dtype=torch.int8).view(torch.bfloat16)  # any bytes, a bf16 tensor
    v1_s, _ = best(lambda: digest_tensor_v1("model.embed_tokens.weight", t), REPEAT)
    reference = None
    for threads in range(1, MAX_THREADS + 1):
        with Workers(threads, "bench-digest") as pool:
            v2_s, digest = best(lambda: digest_tensor("model.embed_tokens.weight", t, pool), REPEAT)
        reference = reference or digest
        if digest != reference:
            raise SystemExit(f"v2 digest with {threads} threads {digest} != with 1 thread {reference}")
        line = json.dumps({"bench": "digest", "bytes": nbytes, "cpus": os.cpu_count(), "threads": threads,
                           "v1_s": round(v1_s, 4), "v2_s": round(v2_s, 4), "v1_gib_s": round(nbytes / 2**30 / v1_s, 2),
                           "v2_gib_s": round(nbytes / 2**30 / v2_s, 2), "speedup_v1_over_v2": round(v1_s / v2_s, 2),
                           "algorithm": DIGEST_ALGORITHM, "repeat": REPEAT})
        print(line, flush=True)
        with open(OUT / "bench_digest.jsonl", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
