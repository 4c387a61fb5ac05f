#!/usr/bin/env bash
# Create .venv (once) with the pinned stack, sa2va_hooks itself (editable) and the test extras.
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$PWD/.venv/bin/python"
if ! (cd / && "$VPY" -c "import sa2va_hooks, xtuner, bitsandbytes, pytest, deepspeed") >/dev/null 2>&1 \
   || ! "$VPY" -c "import importlib.metadata as m; assert m.version('bitsandbytes') == '0.49.2'" >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  # xtuner 0.2.0 pins bitsandbytes==0.45.0, which fails to import with torch 2.14.1
  # ("No module named 'triton.ops'"); PEFT imports bitsandbytes whenever it is installed,
  # so get_peft_model breaks. 0.49.2 imports and works with PEFT 0.21.2. pip prints a
  # warning about xtuner's pin here; that is expected (docs/environment.md).
  .venv/bin/pip install -q --disable-pip-version-check bitsandbytes==0.49.2 2>&1 | grep -v "xtuner 0.2.0 requires bitsandbytes" || true
fi
