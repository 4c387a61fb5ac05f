"""HFExportHook stays thin (issue 17, step 6): at most 200 lines, and it imports only the package's
public face (``sa2va_hooks``, ``sa2va_hooks.export``), ``hooks/common.py``, mmengine and the
standard library, so the core can be rearranged without touching the hook."""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from conftest import imported_modules

PKG = Path(__file__).resolve().parents[2] / "sa2va_hooks"
HOOK = PKG / "hooks" / "hf_export_hook.py"
PUBLIC = {"sa2va_hooks", "sa2va_hooks.export", "sa2va_hooks.hooks.common"}


def _imported_modules(path: Path) -> set[str]:
    return imported_modules(path, PKG.parent)

def _allowed(module: str) -> bool:
    top = module.split(".")[0]
    return module in PUBLIC or top == "mmengine" or (top in sys.stdlib_module_names and top != "sa2va_hooks")


def test_hf_export_hook_imports_only_the_public_face_common_mmengine_and_stdlib():
    bad = sorted(m for m in _imported_modules(HOOK) if not _allowed(m))
    assert not bad, (f"{HOOK.name} imports {bad}: import from sa2va_hooks.export (the public face) or "
                     "hooks/common.py instead, re-exporting the name there if it is missing")


def test_hf_export_hook_is_at_most_200_lines():
    n = len(HOOK.read_text().splitlines())
    assert n <= 200, f"{HOOK.name} has {n} lines; move hook-generic helpers to hooks/common.py, choices to core"


def test_hf_export_hook_imports_resolve_to_names_the_public_face_has():
    """Every name the hook takes from the public face is there (a rename in core shows up here,
    not as an ImportError at training time)."""
    import sa2va_hooks.export as public
    from sa2va_hooks.hooks import common
    modules = {"sa2va_hooks.export": public, "sa2va_hooks.hooks.common": common}
    missing = []
    for node in ast.walk(ast.parse(HOOK.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            mod = {"export": "sa2va_hooks.export", "common": "sa2va_hooks.hooks.common"}.get(node.module or "")
            missing += [f"{mod}.{a.name}" for a in node.names if mod and not hasattr(modules[mod], a.name)]
    assert not missing, missing


def test_fingerprint_hook_follows_the_same_import_rule():
    path = PKG / "hooks" / "fingerprint_hook.py"
    bad = sorted(m for m in _imported_modules(path) if not _allowed(m))
    assert not bad, f"{path.name} imports {bad}"
