"""Each constant has one home, ``sa2va_hooks/core/vocab.py``: no other module assigns one of its
values to a name of its own (a second copy is how two tables drift apart)."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

import sa2va_hooks
from sa2va_hooks.core import vocab
from sa2va_hooks.core.shards import _ST_DTYPES

PACKAGE = Path(sa2va_hooks.__file__).parent
HOMED = {vocab.MANIFEST_FILE, vocab.SINGLE_FILE, vocab.INDEX_FILE, vocab.SIDECAR_SUFFIX, vocab.CHUNK_ELEMENTS,
         vocab.FLUSH_EVERY_BYTES}


def test_no_module_keeps_its_own_copy_of_a_constant():
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "vocab.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                if isinstance(value, (str, int)) and not isinstance(value, bool) and value in HOMED:
                    copies.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
    assert copies == [], "\n".join(copies)


def test_the_dtype_tables_name_real_torch_dtypes_and_safetensors_codes():
    from safetensors.torch import _TYPES  # safetensors' own code -> torch dtype table: the independent reference
    for name, code in vocab.SAFETENSORS_CODES.items():
        assert _TYPES[code] is getattr(torch, name)
    assert {str(d).removeprefix("torch.") for d in _ST_DTYPES} == vocab.STORABLE_DTYPES
    assert set(vocab.EXPORT_DTYPES.values()) <= vocab.STORABLE_DTYPES
