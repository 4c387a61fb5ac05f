"""The training-stall benchmark in its tiny CPU mode: it runs end to end (three real mmengine
trainings, PEFT's merge, the disk floor, the probe, the plot). A smoke run: no timing is asserted,
only that every export it made succeeded and the table and plot came out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_training_stall.py"


def test_training_stall_benchmark_tiny_cpu_mode(tmp_path):
    env = {**os.environ, "SIZES": "tiny", "PROBE": "tiny", "BENCH_OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "bench_training_stall.jsonl").read_text().splitlines()]
    summary = next(r for r in rows if r["step"] == "summary")
    for mode in ("sync", "async"):
        assert summary[mode]["errors"] == [] and len(summary[mode]["export_s"]) == 3, summary[mode]
        assert len(summary[mode]["in_loop_s"]) == 3
    assert all(p > 0 for p in summary["async"]["paused_s"])
    assert "| tiny |" in run.stdout
    png = tmp_path / "plot.png"
    subprocess.run([sys.executable, str(SCRIPT), "--plot", str(tmp_path / "out" / "bench_training_stall.jsonl"),
                    str(png)], env=env, check=True, timeout=300)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_benchmark_short_run_leaks_no_thread_or_file(tmp_path):
    """30 exports instead of 200: threads, open files and the output directory must already be flat
    (exact counts); resident memory is judged by the full run only (docs/benchmarks.md)."""
    env = {**os.environ, "N": "30", "SAMPLE": "5", "WARMUP": "10", "RSS_LIMIT": "1e9",
           "BENCH_OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_soak.py")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "bench_soak.jsonl").read_text().splitlines()]
    summary = rows[-1]
    assert summary["exports"] == 30 and summary["leaks"]["left_in_out_dir"] == ["iter_29", "iter_30"]
    first, last, _ = summary["ours"]["open_files"]
    assert last == first
    assert summary["ours"]["threads"][1] == summary["ours"]["threads"][0]
    assert len([r for r in rows if r.get("loop") == "ours"]) == 7
