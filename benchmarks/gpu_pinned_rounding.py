"""GPU check: does torch's pinned-memory allocator round a buffer up to a power of two in resident memory,
and does registering plain memory with cudaHostRegister avoid that (issue 18: the 12.3 GiB of extra host RSS
at 7.6B)? Prints the RSS growth of each way for a 1.015 GiB buffer (the Qwen2-7B embedding in bf16), whether
torch sees the buffer as pinned, and the D2H copy rate into it.

    python benchmarks/gpu_pinned_rounding.py
"""
from __future__ import annotations

import json
import time

import torch

NBYTES = 152064 * 3584 * 2  # 1,089,994,752 bytes


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def d2h_gib_s(dst: torch.Tensor, src: torch.Tensor) -> float:
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return round(3 * NBYTES / 2**30 / (time.perf_counter() - t), 1)


def main() -> None:
    src = torch.empty(NBYTES, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    r0 = rss()
    pinned = torch.empty(NBYTES, dtype=torch.uint8, pin_memory=True)
    r1 = rss()
    row = {"nbytes": NBYTES, "pin_memory_rss_gib": round((r1 - r0) / 2**30, 3),
           "pin_memory_is_pinned": pinned.is_pinned(), "pin_memory_d2h_gib_s": d2h_gib_s(pinned, src)}
    r2 = rss()
    plain = torch.empty(NBYTES, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(plain.data_ptr(), NBYTES, 0)
    r3 = rss()
    row.update({"register_rc": int(err), "register_rss_gib": round((r3 - r2) / 2**30, 3),
                "register_is_pinned": plain.is_pinned(), "register_d2h_gib_s": d2h_gib_s(plain, src)})
    torch.cuda.cudart().cudaHostUnregister(plain.data_ptr())
    pageable = torch.empty(NBYTES, dtype=torch.uint8)
    pageable.zero_()
    row["pageable_d2h_gib_s"] = d2h_gib_s(pageable, src)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
