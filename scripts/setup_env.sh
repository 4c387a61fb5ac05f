#!/usr/bin/env bash
# Create (or refresh) the virtualenv of one tested stack and install sa2va_hooks into it the way a
# user would. Usage: scripts/setup_env.sh [latest|legacy|newest]   (default: latest)
#
# - The stack is requirements/<stack>.txt, a complete lock (every package, exact version), installed
#   with --no-deps so that it is exactly that stack (xtuner 0.1.23, from ../shared/wheels, wants lagent,
#   which no stack installs: only its chat tool imports it; docs/environment.md says why each stack is what it is).
# - Then `pip install .` with dependency resolution, as a user installs into an existing environment.
#   If that would change any package of the stack, the declared ranges (setup.py) do not admit it
#   and this script fails, naming the packages.
# - The latest stack's venv also gets the pinned development tools (DEV_TOOLS: ruff, which
#   scripts/test.sh runs before pytest), installed when the pin changes (stamp .venv/.dev-tools).
# The venv is .venv for the latest stack and .venv-<stack> for the others; it is rebuilt only when
# the lock file changes. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=${1:-latest}
LOCK=requirements/$STACK.txt
[ -f "$LOCK" ] || { echo "setup_env: no lock file $LOCK (stacks: $(ls requirements | sed 's/\.txt//' | tr '\n' ' '))" >&2; exit 2; }
VENV=.venv
[ "$STACK" = latest ] || VENV=.venv-$STACK
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
PIP=(-q --disable-pip-version-check)
STAMP=$(sha256sum "$LOCK" | cut -c1-16)
if [ "$(cat "$VENV/.stack-lock" 2>/dev/null)" != "$STAMP" ]; then
  echo "setup_env: building $VENV from $LOCK (a few minutes on a fresh machine)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install "${PIP[@]}" --no-deps -r "$LOCK" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, transformers, peft, mmengine" \
    || { echo "setup_env: the $STACK stack does not import; see the errors above" >&2; exit 1; }
  echo "$STAMP" > "$VENV/.stack-lock"
fi
# Development tools, outside the stack's lock (so that a new pin does not rebuild the stack); ruff.toml's
# required-version must match.
DEV_TOOLS="ruff==0.14.0"
if [ "$STACK" = latest ] && [ "$(cat "$VENV/.dev-tools" 2>/dev/null)" != "$DEV_TOOLS" ]; then
  echo "setup_env: installing $DEV_TOOLS into $VENV"
  "$VENV/bin/pip" install "${PIP[@]}" --no-deps $DEV_TOOLS 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/ruff" --version >/dev/null || { echo "setup_env: could not install $DEV_TOOLS" >&2; exit 1; }
  echo "$DEV_TOOLS" > "$VENV/.dev-tools"
fi
# sa2va_hooks itself, with dependency resolution: the ranges must admit this stack as it is
before=$("$VENV/bin/pip" freeze --disable-pip-version-check | grep -v -i "^sa2va.hooks" | sort)
"$VENV/bin/pip" install "${PIP[@]}" . 2>&1 | grep -v -E "^WARNING: Location|dependency resolver does not|^xtuner .* requires" || true
rm -rf build sa2va_hooks.egg-info  # the build's leftovers in the checkout would shadow the installed metadata
after=$("$VENV/bin/pip" freeze --disable-pip-version-check | grep -v -i "^sa2va.hooks" | sort)
if [ "$before" != "$after" ]; then
  echo "setup_env: 'pip install .' changed the $STACK stack; setup.py's ranges do not admit it:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
# A real bitsandbytes 0.45.0 wheel (xtuner 0.2.0's pin) for the test of the clear message it must produce
mkdir -p .cache/wheels
ls .cache/wheels/bitsandbytes-0.45.0-*.whl >/dev/null 2>&1 \
  || "$VENV/bin/pip" download "${PIP[@]}" --no-deps bitsandbytes==0.45.0 -d .cache/wheels 2>&1 | grep -v "^WARNING: Location" || true
