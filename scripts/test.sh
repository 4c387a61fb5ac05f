#!/usr/bin/env bash
# The test suite, on a fresh machine included.
#   bash scripts/test.sh                  # the newcomer's command: one stack, `latest` (.venv), about 8 min on 2 cores + setup
#   STACKS=all bash scripts/test.sh       # the full matrix: latest, legacy, newest (what .ci/run runs)
#   STACKS=legacy bash scripts/test.sh    # any list of stacks (requirements/<stack>.txt); extra arguments go to pytest
# Each stack gets its own virtualenv (scripts/setup_env.sh) and runs the whole suite against this
# checkout; a test a stack cannot run is skipped with a reason that names the version. The latest stack
# first runs the linter, `ruff check .` (ruff.toml): a finding fails the command (the tests still run).
set -uo pipefail
cd "$(dirname "$0")/.."
ALL="latest legacy newest"
STACKS=${STACKS:-latest}
[ "$STACKS" = all ] && STACKS=$ALL
mkdir -p .cache
status=0
summary=()
t_all=$(date +%s)
for stack in $STACKS; do
  t0=$(date +%s)
  echo "=== stack $stack: setting up"
  if ! bash scripts/setup_env.sh "$stack"; then
    summary+=("$stack: SETUP FAILED"); status=1; continue
  fi
  venv=.venv; [ "$stack" = latest ] || venv=.venv-$stack
  echo "=== stack $stack: $("$venv/bin/python" -c 'import importlib.metadata as m, importlib.util as u; print(", ".join(f"{p} {m.version(p)}" if u.find_spec(p) else f"{p} none" for p in ("torch", "transformers", "peft", "mmengine", "xtuner", "deepspeed")))')"
  if [ "$stack" = latest ]; then  # the linter, once (ruff.toml; the pin is in scripts/setup_env.sh)
    echo "=== lint: ruff check"
    if "$venv/bin/ruff" check .; then lint="lint: ruff clean"; else lint="lint: ruff check FAILED (above)"; status=1; fi
    summary+=("$lint")
  fi
  t1=$(date +%s)
  PYTHONPATH="$PWD" SA2VA_STACK="$stack" "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests "$@" \
    | tee ".cache/pytest-$stack.log"; rc=${PIPESTATUS[0]}
  line=$(grep -E "(passed|failed|error)" ".cache/pytest-$stack.log" | tail -1)
  t2=$(date +%s)
  summary+=("$stack: ${line//=/} (rc $rc; tests $(( t2 - t1 )) s, with setup $(( t2 - t0 )) s)")
  [ "$rc" = 0 ] || status=1
done
echo "=== matrix ($(( $(date +%s) - t_all )) s in all)"
printf '%s\n' "${summary[@]}"
exit $status
