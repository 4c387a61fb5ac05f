"""``sa2va_hooks.core.plan.parse_dtype``: the export's ``dtype`` option (HFExportHook, tools/export.py).

Pinned: every accepted spelling (short and long names, ``torch.`` prefix, any case) gives the torch
dtype written out by hand here; ``None``, ``'auto'``, ``'none'`` and ``'keep'`` mean "keep as in
memory" (None); a ``torch.dtype`` passes through unchanged; anything else is a ValueError whose
message names the value and every accepted spelling, so a typo in a config is caught before
training, with the fix in the message.
"""
from __future__ import annotations

import pytest
import torch

from sa2va_hooks.core.plan import parse_dtype

ACCEPTED = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
            "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("spelling, expected", sorted(ACCEPTED.items()))
def test_every_accepted_spelling(spelling, expected):
    assert parse_dtype(spelling) is expected
    assert parse_dtype(spelling.upper()) is expected
    assert parse_dtype(f"torch.{spelling}") is expected


def test_str_of_a_torch_dtype_is_accepted():
    """A dtype that went through a config file as text: ``str(torch.bfloat16) == 'torch.bfloat16'``."""
    for d in (torch.float32, torch.float16, torch.bfloat16):
        assert parse_dtype(str(d)) is d


@pytest.mark.parametrize("keep", [None, "auto", "none", "keep", "AUTO", "None", "Keep"])
def test_keep_as_in_memory(keep):
    assert parse_dtype(keep) is None


@pytest.mark.parametrize("d", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
def test_a_torch_dtype_passes_through(d):
    assert parse_dtype(d) is d


@pytest.mark.parametrize("bad", ["fp8", "float64", "int8", "bfloat", "fp 16", " bf16", "", "torch.", 16, 3.5])
def test_unknown_raises_naming_the_value_and_the_accepted_ones(bad):
    with pytest.raises(ValueError) as e:
        parse_dtype(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    for name in ACCEPTED:
        assert f"'{name}'" in msg, f"the message does not offer {name!r}: {msg}"
    assert "'auto'" in msg
