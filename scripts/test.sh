#!/usr/bin/env bash
# The test suite, on a fresh machine included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
