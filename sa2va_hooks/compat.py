"""Small, documented compatibility shims for the pinned training stack.

xtuner 0.2.0's ``SupervisedFinetune._prepare_for_flash_attn`` calls
``torch.cpu.is_bf16_supported()``, which torch 2.14 does not have, so xtuner cannot even build
a model on a CPU-only machine (where users convert checkpoints). The shim defines it, returning
False, only when it is missing; it never replaces a real implementation.

Lazy (xtuner-style) configs build the model before any hook is imported, so importing
``sa2va_hooks`` is too late for a training run: ``tools/train.py`` applies the shim in-process
and then runs xtuner's own train module.
"""
from __future__ import annotations

import torch


def _cpu_bf16_unsupported() -> bool:
    """Stand-in for the missing torch.cpu.is_bf16_supported: report no bf16 so that xtuner
    picks fp32/fp16 paths on the CPU."""
    return False


def apply_torch_cpu_bf16_shim() -> bool:
    """Define torch.cpu.is_bf16_supported if missing. Returns True when the shim was applied."""
    if hasattr(torch.cpu, "is_bf16_supported"):
        return False
    torch.cpu.is_bf16_supported = _cpu_bf16_unsupported  # type: ignore[attr-defined]
    return True
