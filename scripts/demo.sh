#!/usr/bin/env bash
# The main job: train the tiny Sa2VA-shaped model on the CPU with the hooks, export, verify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python tools/demo.py "$@"
