"""Run xtuner's own training entry point with sa2va_hooks' compatibility shims applied first.

    python tools/train.py CONFIG [xtuner train args...]

Why a wrapper: xtuner-style configs are parsed in mmengine's lazy-import mode, where
``custom_imports`` is ignored and the Runner builds the model before any hook exists. A shim
applied when the hooks are imported therefore comes too late on a CPU-only machine, where
xtuner 0.2.0 needs ``torch.cpu.is_bf16_supported`` to build the model. This applies the shims
in-process and then runs ``xtuner.tools.train`` unchanged.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from sa2va_hooks.compat import allow_mmengine_checkpoint_globals, apply_torch_cpu_bf16_shim
    apply_torch_cpu_bf16_shim()
    allow_mmengine_checkpoint_globals()
    llm_dir = os.environ.get("SA2VA_TINY_LLM")
    if llm_dir:  # the tiny demo LLM, made on first use
        from sa2va_demo.tiny_llm import make_tiny_llm
        make_tiny_llm(llm_dir)
    sys.argv = ["xtuner.tools.train", *sys.argv[1:]]
    runpy.run_module("xtuner.tools.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
