"""The training-stall benchmark in its tiny CPU mode: it runs end to end (three real mmengine
trainings, PEFT's merge, the disk floor, the probe, the plot). A smoke run: no timing is asserted,
only that every export it made succeeded and the table and plot came out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
