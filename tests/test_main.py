"""__main__.py: ``python -m sa2va_hooks`` is the CLI, with its exit codes (run as a real subprocess
from outside the checkout, the package on PYTHONPATH)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sa2va_hooks

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sa2va_hooks", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_python_m_runs_the_cli_and_returns_its_exit_codes(tmp_path):
    ok = _run(["--version"], tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == f"sa2va_hooks {sa2va_hooks.__version__}"
    bad = _run(["verify", str(tmp_path / "no_such_snapshot")], tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr and "no_such_snapshot" in bad.stderr
