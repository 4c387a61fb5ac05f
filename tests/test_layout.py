"""The house: the core and the export path need no mmengine, offline needs no hooks, converters
import no sibling converter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from conftest import imported_modules

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sa2va_hooks"

WITHOUT_MMENGINE = r'''
import sys
class NoMmengine:  # as if mmengine were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mmengine":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoMmengine())
import sa2va_hooks.core, sa2va_hooks.core.merge, sa2va_hooks.core.writer, sa2va_hooks.core.verify
import sa2va_hooks.core.fingerprint, sa2va_hooks.core.snapshot, sa2va_hooks.core.manifest
import sa2va_hooks.core.pipeline, sa2va_hooks.core.loadcheck
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from sa2va_hooks import export_hf, verify_snapshot
out = sys.argv[1]
export_hf(Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=32)), out)
assert verify_snapshot(out) == []
assert not [m for m in sys.modules if m.split(".")[0] == "mmengine"], "mmengine was imported"
try:
    from sa2va_hooks import HFExportHook
except ImportError as e:
    print("hooks:", e)
'''


def test_core_and_export_work_without_mmengine(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_MMENGINE, str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hooks: sa2va_hooks.HFExportHook needs mmengine" in proc.stdout


def _imports(path: Path) -> set[str]:
    return imported_modules(path, ROOT, with_names=True)

def test_offline_does_not_import_the_hooks():
    bad = {f.name: sorted(m for m in _imports(f) if m.startswith("sa2va_hooks.hooks"))
           for f in (PKG / "offline").glob("*.py")}
    assert not any(bad.values()), bad


def test_core_does_not_import_mmengine_or_the_package_above_it():
    allowed = ("sa2va_hooks.core",)
    bad = {f.name: sorted(m for m in _imports(f) if m.split(".")[0] == "mmengine" or
                          (m.startswith("sa2va_hooks.") and not m.startswith(allowed)))
           for f in (PKG / "core").glob("*.py")}
    assert not any(bad.values()), bad


def test_converters_import_no_sibling_converter():
    families = {f.stem for f in (PKG / "converters").glob("*.py")} - {"__init__", "base", "helpers", "remote_code"}
    bad = {f.name: sorted(m for m in _imports(f) if m.rsplit(".", 1)[-1] in families or
                          any(f"sa2va_hooks.converters.{x}" in m for x in families))
           for f in (PKG / "converters").glob("*.py") if f.stem in families}
    assert not any(bad.values()), bad


def test_the_installed_package_holds_no_demo_and_installs_only_itself():
    assert not (PKG / "demo").exists()
    from setuptools import find_packages
    installed = find_packages(str(ROOT), include=["sa2va_hooks", "sa2va_hooks.*"])
    assert installed and all(p.split(".")[0] == "sa2va_hooks" for p in installed)
    assert "include=[\"sa2va_hooks\", \"sa2va_hooks.*\"]" in (ROOT / "setup.py").read_text()
    demo_in_pkg = [f for f in PKG.rglob("*.py") if "sa2va_demo" in f.read_text() or "Tiny" in f.stem]
    assert not demo_in_pkg, demo_in_pkg


def test_demo_converters_rank_below_every_real_converter():
    """The tiny models' converters are picked by name; "auto" on a Sa2VA-shaped model (the tiny one
    included) picks the real converter."""
    import sa2va_demo.families  # noqa: F401 - registers tiny_sa2va_qwen
    import sa2va_demo.tiny_sa2va  # noqa: F401 - registers tiny_sa2va
    from sa2va_hooks.converters.base import CONVERTERS
    classes = list(CONVERTERS.module_dict.values())
    real = [c for c in classes if c.__module__.startswith("sa2va_hooks.")]
    demo = [c for c in classes if c.__module__.startswith("sa2va_demo.")]
    assert len(demo) == 2 and len(real) >= 5
    assert max(c.priority for c in demo) < min(c.priority for c in real)


def test_auto_picks_the_real_converter_for_the_tiny_model(tiny_base):
    from sa2va_demo.tiny_sa2va import TinySa2VA
    from sa2va_hooks.converters.base import detect_converter
    from sa2va_hooks.converters.sa2va import Sa2VAConverter
    assert detect_converter(TinySa2VA(str(tiny_base))) is Sa2VAConverter


def test_the_export_pipeline_lives_in_core_and_the_facade_only_resolves_the_converter():
    facade = (PKG / "export.py").read_text()
    # < 70 lines: the facade also re-exports every name the hooks use (step 6 of issue 17), one line per core module
    assert len(facade.splitlines()) < 70 and "class " not in facade
    ours = {m for m in _imports(PKG / "export.py") if m.startswith("sa2va_hooks")}
    assert all(m.startswith(("sa2va_hooks.core", "sa2va_hooks.converters.base")) for m in ours), ours
    tree = ast.parse((PKG / "core" / "pipeline.py").read_text())
    finish = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_finish")
    assert finish.end_lineno - finish.lineno < 30, "the finishing step should stay a short sequence of named steps"


def test_test_files_have_unique_basenames():
    """tests/ has no __init__.py (pytest's prepend import mode): two test files of one name in two folders
    would make the second fail to collect, and only when both are collected."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
