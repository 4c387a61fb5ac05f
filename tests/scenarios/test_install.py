"""The package as a user installs it, and the bitsandbytes trap.

- The installed copy (``pip install .`` by scripts/setup_env.sh), run from outside the checkout:
  ``--version`` and ``doctor`` report what is really installed, and doctor's export check passes.
- A real bitsandbytes 0.45.0 wheel (xtuner 0.2.0's pin), unpacked beside the stack: where it cannot
  be imported (triton >= 3.2 has no ``triton.ops``; every tested stack), importing sa2va_hooks, the CLI
  and tools/export.py each stop with one message naming the version, the cause and the pip command;
  where it can (triton 3.0, torch < 2.6: no tested stack since issue 16), nothing is said and PEFT
  builds LoRA models.
"""
from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BNB_WHEEL = sorted((ROOT / ".cache" / "wheels").glob("bitsandbytes-0.45.0-*.whl"))


def _run(args, cwd, extra_path: str | None = None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy, not the checkout
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _installed_copy(tmp_path) -> Path:
    """Where a user's ``import sa2va_hooks`` finds the package (outside the checkout, no PYTHONPATH)."""
    proc = _run(["-c", "import sa2va_hooks; print(sa2va_hooks.__file__)"], tmp_path)
    if proc.returncode != 0:
        pytest.skip(f"sa2va_hooks is not installed in this environment (scripts/setup_env.sh installs it): "
                    f"{proc.stderr.strip().splitlines()[-1:]}")
    where = Path(proc.stdout.strip().splitlines()[-1]).parent
    if where == ROOT / "sa2va_hooks":  # (the virtualenvs live inside the checkout, so compare exactly)
        pytest.skip("sa2va_hooks is installed in editable mode here; the test wants a real install")
    return where


def test_installed_package_reports_its_version_and_passes_doctor(tmp_path):
    where = _installed_copy(tmp_path)
    v = _run(["-m", "sa2va_hooks", "--version"], tmp_path)
    assert v.returncode == 0, v.stderr
    version = _run(["-c", "import importlib.metadata as m; print(m.version('sa2va_hooks'))"], tmp_path).stdout.strip()
    assert v.stdout.strip() == f"sa2va_hooks {version}"
    d = _run(["-m", "sa2va_hooks", "doctor"], tmp_path)
    assert d.returncode == 0, d.stdout + d.stderr
    assert sys.executable in d.stdout
    for dist in ("torch", "transformers", "peft", "mmengine", "safetensors"):
        assert f"{dist} " in d.stdout and metadata.version(dist) in d.stdout, (dist, d.stdout)
    assert "[works] LoRA merge + export + verify + from_pretrained" in d.stdout, d.stdout
    assert "doctor: OK" in d.stdout
    # the install holds the whole package and nothing of the demo (issue 10: the demo sits beside it)
    assert (where / "core" / "pipeline.py").is_file() and (where / "core" / "loadcheck.py").is_file()
    assert not (where / "demo").exists() and not [p for p in where.rglob("*") if "tiny" in p.name], where
    demo = _run(["-c", "import sa2va_demo"], tmp_path)
    assert demo.returncode != 0 and "No module named 'sa2va_demo'" in demo.stderr, demo.stderr


def test_declared_ranges_admit_this_stack(tmp_path):
    """The installed package declares a lower-bounded range for each core package, and this stack lies
    inside every one of them (what doctor prints, read from the installed metadata)."""
    _installed_copy(tmp_path)
    proc = _run(["-c", "import json; from sa2va_hooks.environment import CORE, version_rows; "
                       "print(json.dumps([CORE, version_rows()]))"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json
    core, rows = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {name: (got, spec, ok) for name, got, spec, ok in rows}
    assert all(rows[n][1].startswith(">=") for n in core), rows
    assert [n for n in core if not rows[n][2]] == [], rows


@pytest.fixture(scope="module")
def old_bnb(tmp_path_factory) -> Path:
    if not BNB_WHEEL:
        pytest.skip("no bitsandbytes 0.45.0 wheel in .cache/wheels (scripts/setup_env.sh downloads it)")
    where = tmp_path_factory.mktemp("bnb045")
    with zipfile.ZipFile(BNB_WHEEL[0]) as z:
        z.extractall(where)
    return where


def _triton_ops_missing() -> bool:
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("triton.ops") is None


def test_bitsandbytes_that_peft_cannot_use_is_one_clear_message(old_bnb, tmp_path):
    path = os.pathsep.join([str(old_bnb), str(ROOT)])
    runs = {"import": _run(["-c", "import sa2va_hooks"], tmp_path, path),
            "cli": _run(["-m", "sa2va_hooks", "--version"], tmp_path, path),
            "tools/export.py": _run([str(ROOT / "tools" / "export.py"), "cfg.py", "ckpt.pth", "--out", "x"],
                                    tmp_path, path)}
    if not _triton_ops_missing():
        # bitsandbytes 0.45.0 works here (triton < 3.2): no false alarm, and PEFT builds with it
        assert runs["import"].returncode == 0, runs["import"].stderr
        peft = _run(["-c", "import bitsandbytes, sa2va_hooks; from peft import LoraConfig, get_peft_model; "
                           "from transformers import Qwen2Config, Qwen2ForCausalLM; "
                           "get_peft_model(Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, "
                           "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=32)), "
                           "LoraConfig(r=2, target_modules=['q_proj']))"], tmp_path, path)
        assert peft.returncode == 0, peft.stderr
        return
    # the failure is real: PEFT itself dies inside bitsandbytes without us
    raw = _run(["-c", "from peft import LoraConfig, get_peft_model; "
                      "from transformers import Qwen2Config, Qwen2ForCausalLM; "
                      "get_peft_model(Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, "
                      "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=32)), "
                      "LoraConfig(r=2, target_modules=['q_proj']))"], tmp_path, str(old_bnb))
    assert raw.returncode != 0 and "triton.ops" in raw.stderr
    for how, proc in runs.items():
        assert proc.returncode != 0, (how, proc.stdout)
        last = proc.stderr.strip().splitlines()[-1]
        assert "IncompatibleDependencyError: bitsandbytes 0.45.0 is installed but cannot be imported" in last, \
            (how, proc.stderr[-2000:])
        assert "No module named 'triton.ops'" in last and "triton >= 3.2 removed" in last, how
        assert "pip install 'bitsandbytes>=0.45.1'" in last, how
        # one message: bitsandbytes' own traceback is not dumped on top of it
        assert proc.stderr.count("Traceback") <= 1, (how, proc.stderr[-3000:])
    assert runs["tools/export.py"].returncode == 2 and "Traceback" not in runs["tools/export.py"].stderr
