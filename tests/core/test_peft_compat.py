"""``sa2va_hooks/core/peft_compat.py``: the PEFT shims the merge needs, and the core closed on itself
(it imports nothing of the package outside ``sa2va_hooks/core/``)."""
from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import sa2va_hooks
from sa2va_hooks.core.peft_compat import AuxiliaryTrainingWrapper, active_saved_copies

CORE = Path(sa2va_hooks.__file__).parent / "core"


def test_active_saved_copies_reads_both_peft_spellings():
    assert active_saved_copies(SimpleNamespace(active_adapters=["a", "b"])) == ["a", "b"]
    assert active_saved_copies(SimpleNamespace(active_adapters="a")) == ["a"]
    assert active_saved_copies(SimpleNamespace(active_adapter="old")) == ["old"]  # peft < 0.12


def test_auxiliary_training_wrapper_is_a_class():
    assert isinstance(AuxiliaryTrainingWrapper, type)


def test_core_imports_nothing_of_the_package_outside_core():
    outside = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                outside.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sa2va_hooks"):
                if not node.module.startswith("sa2va_hooks.core"):
                    outside.append(f"{path.name}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import):
                outside += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                            if a.name.startswith("sa2va_hooks") and not a.name.startswith("sa2va_hooks.core")]
    assert outside == [], "\n".join(outside)
