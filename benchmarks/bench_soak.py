"""Benchmark: 200 exports in one process, as a long training makes them. Is anything left behind?

The tiny Sa2VA-shaped model (LoRA, modules_to_save, remote code, tokenizer: every file kind and the
load check's remote-code import) is changed a little before each export, exported, and the
snapshot before last removed (keep_last=2), alternating the synchronous ``export_hf`` with the
background ``start_export`` that the hook uses, with ``link_from`` the previous snapshot. Every
SAMPLE exports it records resident memory, threads and open files. The same loop with PEFT's
``merge_and_unload`` on a copy + ``save_pretrained`` (the anchor) runs in the same process first,
for the allocator's own drift, and a raw write + fsync of the same bytes gives the disk floor.

Prints one JSON line per sample and a summary; exits 1 if threads or open files grew, or if the
resident memory grew by more than RSS_LIMIT MiB per 100 exports beyond the anchor's drift.
Env: N (200), SAMPLE (10), WARMUP (20), RSS_LIMIT (2.0), WORK, BENCH_OUT.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N = int(os.environ.get("N", "200"))
SAMPLE = int(os.environ.get("SAMPLE", "10"))
WARMUP = int(os.environ.get("WARMUP", "20"))
WORK = Path(os.environ.get("WORK", "/tmp/bench_soak"))
RSS_LIMIT = float(os.environ.get("RSS_LIMIT", "2.0"))  # MiB per 100 exports beyond the anchor's drift
OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")
PROC = psutil.Process()


def state() -> dict:
    return {"rss_mib": round(PROC.memory_info().rss / 2**20, 2), "threads": PROC.num_threads(),
            "open_files": PROC.num_fds()}


def build():
    from sa2va_demo.tiny_sa2va import TinySa2VA, make_tiny_base
    torch.manual_seed(0)
    return TinySa2VA(str(make_tiny_base(WORK / "base"))).eval()


def nudge(model, i: int) -> None:
    """What a training step does to the exported tensors: every trainable one changes."""
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3)


def loop(name: str, export_one, n: int, emit) -> list[dict]:
    samples, times = [], []
    for i in range(1, n + 1):
        t = time.perf_counter()
        export_one(i)
        times.append(time.perf_counter() - t)
        if i % SAMPLE == 0 or i == 1:
            row = {"loop": name, "export": i, **state(),
                   "s_per_export": round(sum(times[-SAMPLE:]) / len(times[-SAMPLE:]), 4)}
            samples.append(row)
            emit(row)
    return samples


def ours(model, root: Path):
    from sa2va_hooks import export_hf
    from sa2va_hooks.core.snapshot import SnapshotBuffers
    from sa2va_hooks.core.publish import remove_snapshot
    from sa2va_hooks.export import start_export
    buffers = SnapshotBuffers()

    def one(i: int) -> None:
        nudge(model, i)
        out, prev = root / f"iter_{i}", root / f"iter_{i - 1}"
        link = prev if prev.is_dir() else None
        if i % 2:
            m = export_hf(model, out, converter="tiny_sa2va", dtype="bf16", link_from=link)
        else:
            job = start_export(model, out, buffers=buffers, converter="tiny_sa2va", dtype="bf16", link_from=link)
            job.wait()
            m = job.result()
        assert m.tensors and (out / "config.json").is_file()
        old = root / f"iter_{i - 2}"
        if old.is_dir():
            remove_snapshot(old)
    return one


def anchor(model, root: Path):
    def one(i: int) -> None:
        nudge(model, i)
        out = root / f"iter_{i}"
        merged = copy.deepcopy(model.mllm.model.language_model).merge_and_unload()
        merged.save_pretrained(str(out))
        del merged
        shutil.rmtree(root / f"iter_{i - 2}", ignore_errors=True)
    return one


def raw(nbytes: int, root: Path):
    data = os.urandom(nbytes)

    def one(i: int) -> None:
        path = root / f"raw_{i}"
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        (root / f"raw_{i - 2}").unlink(missing_ok=True)
    return one


def drift(samples: list[dict]) -> dict:
    """Growth after the warm-up: last sample minus the first one at or after WARMUP, per 100 exports."""
    after = [s for s in samples if s["export"] >= WARMUP] or samples
    first, last = after[0], after[-1]
    span = max(last["export"] - first["export"], 1)
    return {"rss_mib_per_100": round((last["rss_mib"] - first["rss_mib"]) * 100 / span, 3),
            "rss_max_mib": max(s["rss_mib"] for s in after), "rss_first_mib": first["rss_mib"],
            "rss_last_mib": last["rss_mib"],
            # first and last sample after the warm-up, and the most seen (a background job's thread may
            # still be exiting when a sample is taken right after the job reported its result)
            "threads": [first["threads"], last["threads"], max(s["threads"] for s in after)],
            "open_files": [first["open_files"], last["open_files"], max(s["open_files"] for s in after)],
            "s_per_export": round(sum(s["s_per_export"] for s in after) / len(after), 4)}


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = open(OUT / "bench_soak.jsonl", "w")

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    model = build()
    runs = {}
    for name, make in (("anchor_peft", anchor), ("ours", ours)):
        root = WORK / name
        root.mkdir(parents=True)
        runs[name] = drift(loop(name, make(model, root), N, emit))
    nbytes = sum(f.stat().st_size for f in (WORK / "ours" / f"iter_{N}").glob("*.safetensors"))
    (WORK / "raw").mkdir()
    runs["raw_write"] = drift(loop("raw_write", raw(nbytes, WORK / "raw"), N, emit))
    left = sorted(p.name for p in (WORK / "ours").iterdir())
    leaks = {
        "threads_grew": runs["ours"]["threads"][1] > runs["ours"]["threads"][0],
        "open_files_grew": runs["ours"]["open_files"][1] > runs["ours"]["open_files"][0],
        "rss_beyond_anchor_mib_per_100": round(runs["ours"]["rss_mib_per_100"]
                                               - max(runs["anchor_peft"]["rss_mib_per_100"], 0), 3),
        "left_in_out_dir": left,
    }
    ok = (not leaks["threads_grew"] and not leaks["open_files_grew"]
          and leaks["rss_beyond_anchor_mib_per_100"] <= RSS_LIMIT and left == [f"iter_{N - 1}", f"iter_{N}"])
    summary = {"step": "summary", "exports": N, "snapshot_bytes": nbytes, **runs, "leaks": leaks, "flat": ok,
               "time_ratio_ours_vs_peft": round(runs["ours"]["s_per_export"] / runs["anchor_peft"]["s_per_export"], 2),
               "time_ratio_ours_vs_raw": round(runs["ours"]["s_per_export"] / runs["raw_write"]["s_per_export"], 2)}
    emit(summary)
    print(f"\n{N} exports: ours RSS {runs['ours']['rss_first_mib']} -> {runs['ours']['rss_last_mib']} MiB "
          f"({runs['ours']['rss_mib_per_100']} MiB/100 exports; PEFT anchor {runs['anchor_peft']['rss_mib_per_100']}), "
          f"threads (first, last, max) {runs['ours']['threads']}, open files {runs['ours']['open_files']}, "
          f"{runs['ours']['s_per_export']} s/export = {summary['time_ratio_ours_vs_peft']}x PEFT merge+save, "
          f"{summary['time_ratio_ours_vs_raw']}x raw write: {'FLAT' if ok else 'NOT FLAT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
