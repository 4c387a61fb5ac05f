#!/usr/bin/env bash
# The test suite on every tested stack (what .ci/run runs), on a fresh machine included.
#   bash scripts/test.sh                  # all stacks: default, newest, sa2va (requirements/*.txt)
#   STACKS=default bash scripts/test.sh   # one stack; extra arguments go to pytest
# Each stack gets its own virtualenv (scripts/setup_env.sh) and runs the whole suite against this
# checkout; a test a stack cannot run is skipped with a reason that names the version.
set -uo pipefail
cd "$(dirname "$0")/.."
STACKS=${STACKS:-"default newest sa2va"}
status=0
summary=()
for stack in $STACKS; do
  t0=$(date +%s)
  echo "=== stack $stack: setting up"
  if ! bash scripts/setup_env.sh "$stack"; then
    summary+=("$stack: SETUP FAILED"); status=1; continue
  fi
  venv=.venv; [ "$stack" = default ] || venv=.venv-$stack
  echo "=== stack $stack: $("$venv/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft", "mmengine")))')"
  PYTHONPATH="$PWD" SA2VA_STACK="$stack" "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests "$@" \
    | tee ".cache/pytest-$stack.log"; rc=${PIPESTATUS[0]}
  line=$(grep -E "(passed|failed|error)" ".cache/pytest-$stack.log" | tail -1)
  summary+=("$stack: ${line//=/} (rc $rc, $(( $(date +%s) - t0 )) s with setup)")
  [ "$rc" = 0 ] || status=1
done
echo "=== matrix"
printf '%s\n' "${summary[@]}"
exit $status
