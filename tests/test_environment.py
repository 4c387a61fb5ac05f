"""environment.py: the bitsandbytes check and doctor's version table, with the installed versions
replaced by hand-picked ones (monkeypatched ``importlib.metadata``), and compared with
``packaging``'s own reading of the declared ranges. The real bitsandbytes 0.45.0 wheel beside each
stack is tests/scenarios/test_install.py."""
from __future__ import annotations

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from sa2va_hooks import environment as env


def _versions(monkeypatch, table: dict[str, str | None]):
    real = env._version
    monkeypatch.setattr(env, "_version", lambda d: table[d] if d in table else real(d))


def test_a_fixed_bitsandbytes_is_never_imported(monkeypatch):
    _versions(monkeypatch, {"bitsandbytes": str(env.BNB_TRITON_OPS_FIXED)})
    monkeypatch.setattr(env.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(env.importlib, "import_module", lambda name: pytest.fail("imported"))
    assert env.bitsandbytes_problem() is None
    env.check_bitsandbytes()


def test_an_old_bitsandbytes_that_fails_to_import_is_one_message_naming_version_cause_and_fix(monkeypatch):
    _versions(monkeypatch, {"bitsandbytes": "0.45.0", "torch": "2.9.1", "triton": "3.5.0"})
    monkeypatch.setattr(env.importlib.util, "find_spec", lambda name: object())

    def broken(name):
        raise ModuleNotFoundError("No module named 'triton.ops'")
    monkeypatch.setattr(env.importlib, "import_module", broken)
    with pytest.raises(env.IncompatibleDependencyError) as e:
        env.check_bitsandbytes()
    msg = str(e.value)
    for words in ("bitsandbytes 0.45.0 is installed but cannot be imported with torch 2.9.1 (triton 3.5.0)",
                  "No module named 'triton.ops'", "pip install 'bitsandbytes>=0.45.1'", "pip uninstall bitsandbytes"):
        assert words in msg


def test_an_old_bitsandbytes_that_imports_is_fine(monkeypatch):
    _versions(monkeypatch, {"bitsandbytes": "0.44.0"})
    monkeypatch.setattr(env.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(env.importlib, "import_module", lambda name: object())
    assert env.bitsandbytes_problem() is None


def test_no_bitsandbytes_is_fine(monkeypatch):
    _versions(monkeypatch, {"bitsandbytes": None})
    assert env.bitsandbytes_problem() is None


def test_version_rows_judge_each_package_as_packaging_does(monkeypatch):
    ranges = {"torch": ">=2.1,<3", "peft": ">=0.11", "mmengine": ">=0.10.3"}
    monkeypatch.setattr(env, "declared_ranges", lambda: ranges)
    installed = {"torch": "2.9.1", "peft": "0.10.0", "mmengine": "0.10.7", "transformers": "4.57.1",
                 "safetensors": None, "xxhash": "3.5.0", "numpy": "2.1.0", "xtuner": None, "deepspeed": "0.18.9",
                 "bitsandbytes": None, "accelerate": "1.0.0"}
    _versions(monkeypatch, installed)
    rows = {name: (got, spec, ok) for name, got, spec, ok in env.version_rows()}
    assert set(rows) == set(env.CORE + env.OPTIONAL)
    for name, (got, spec, ok) in rows.items():
        have = installed[name]
        assert got == (have or "missing")
        if name in ranges:
            assert spec == ranges[name] and ok == (have is not None and Version(have) in SpecifierSet(ranges[name]))
        elif name in env.OPTIONAL:
            assert spec == "optional" and ok  # an optional package may be missing
        else:
            assert spec == "" and ok == (have is not None)
    assert rows["peft"][2] is False and rows["torch"][2] is True and rows["safetensors"][2] is False


def test_declared_ranges_are_the_installed_requirements_without_markers(monkeypatch):
    monkeypatch.setattr(env.metadata, "requires",
                        lambda dist: ["torch>=2.1", "PEFT<1,>=0.11", "xtuner>=0.1; extra == 'xtuner'"])
    got = env.declared_ranges()
    assert got.keys() == {"torch", "peft"}
    assert SpecifierSet(got["peft"]) == SpecifierSet(">=0.11,<1")
    assert SpecifierSet(got["torch"]) == SpecifierSet(">=2.1")

    def missing(dist):
        raise env.metadata.PackageNotFoundError(dist)
    monkeypatch.setattr(env.metadata, "requires", missing)
    assert env.declared_ranges() == {}
