#!/usr/bin/env bash
# Sa2VA v2 stand-in training (configs/sa2va_v2_tiny.py) under xtuner 0.1.23's own DeepSpeed launch
# (tests/dist_launch.py -> xtuner.tools.train, 2 processes over NCCL, one GPU each) with our hooks,
# on a lent 2-GPU machine (device kind nvidia-h200-x2), for issue 16. The GPU version of
# tests/scenarios/test_sa2va_v2_distributed.py, with the same checks, plus ZeRO-3 with v2's default
# modules_to_save (which fails in training on the CPU).
#
#   device run, carry [".whl"]:  bash benchmarks/gpu_sa2va_v2_check.sh
#   .whl holds the `latest` stack's wheels for the image's Python 3.12 (transformers 4.57.0,
#   tokenizers 0.22.1, huggingface_hub 0.36.2, safetensors, peft 0.17.1, mmengine 0.10.7 and its small
#   deps, deepspeed 0.18.9 and its deps, xtuner 0.1.23, datasets/dill/multiprocess, einops, xxhash);
#   the image's torch 2.11 stays.
#   (to test a commit rather than a working tree others are editing: carry `git archive` of it and
#   run from its extraction, with REV=<commit> for the summary)
#   dry run here on the CPU (gloo, ds_zero*_cpu.json):  MODE=cpu PY=.venv/bin/python bash benchmarks/gpu_sa2va_v2_check.sh
#
# Cases: CASES="family:zero:mts ..." (mts = v2, v2's modules_to_save=['lm_head','embed_tokens'], or
# none, model.modules_to_save=None); default: every family x zero2:v2, zero3:v2, zero3:none. The
# families of one (zero, mts) run side by side (own port, own work dir); checks run one at a time.
#
# On CUDA, each rank calls torch.cuda.set_device(LOCAL_RANK) before tests/dist_launch.py runs (a
# wrapper written to /tmp): when this ran, dist_launch's CPU workaround 1 replaced torch.cuda.set_device
# with a no-op unconditionally (since fixed: only without CUDA), which is not a no-op with CUDA (mmengine's and DeepSpeed's own set_device
# calls would do nothing). PROBE_NO_PRESET=1 (default on CUDA) also runs one case with
# tests/dist_launch.py alone, to record what that does. env_cfg.dist_cfg.backend=nccl on CUDA
# (configs/_base_/tiny_runtime.py says gloo, for the CPU).
set -u
MODE=${MODE:-cuda}
PY=${PY:-python3}
REPO=$(pwd)
case $PY in */*) PY=$(realpath -s "$PY");; esac  # the launches run in their work dirs
OUT=${OUT:-/tmp/gpu_sa2va_v2_out}
BASE=${BASE:-/tmp/sa2va_v2_gpu}
mkdir -p "$OUT" && rm -rf "$BASE" && mkdir -p "$BASE"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

if [ "$MODE" = cuda ] && [ -d .whl ] && [ "${SKIP_INSTALL:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "wheel install FAILED"; exit 1; }
  export PYTHONPATH=/tmp/site:$REPO
else
  export PYTHONPATH=$REPO
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
if [ "$MODE" = cpu ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  DSSUF=cpu; BACKEND=gloo
else
  DSSUF=gpu; BACKEND=nccl
fi

say "== gpu_sa2va_v2_check $(date -u +%FT%TZ) mode=$MODE repo=${REV:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
$PY - <<'EOF' 2>&1 | grep -v "^\[20" | tee -a "$SUMMARY"
import importlib, importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ["transformers", "tokenizers", "huggingface_hub", "safetensors", "peft", "accelerate", "mmengine",
             "deepspeed", "xtuner", "datasets", "numpy", "einops", "xxhash", "pydantic", "triton"]:
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', md.version(name))} {m.__file__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} IMPORT FAILED: {e!r}")
import deepspeed.accelerator as a
print("deepspeed accelerator", a.get_accelerator()._name)
EOF
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$SUMMARY"

# each rank on its own GPU before tests/dist_launch.py makes torch.cuda.set_device a no-op; report CUDA use at exit
cat >/tmp/gpu_launch.py <<'EOF'
import atexit, os, runpy, sys
import torch
rank = int(os.environ.get("LOCAL_RANK", "0"))
if torch.cuda.is_available() and os.environ.get("PRESET_DEVICE", "1") == "1":
    torch.cuda.set_device(rank)
def _report():
    if torch.cuda.is_available():
        print(f"[gpu_check] rank {os.environ.get('RANK')} current_device {torch.cuda.current_device()} "
              f"max_memory_allocated {torch.cuda.max_memory_allocated()} B on {torch.cuda.get_device_name()}", flush=True)
atexit.register(_report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
EOF

hf_dir() { case $1 in internvl) echo hf_internvl;; qwen2_5_vl) echo hf_qwen2_5_vl;; qwen3_vl) echo hf_qwen3vl;; esac; }

launch() {  # family zero mts port [preset]
  local F=$1 Z=$2 M=$3 PORT=$4 PRESET=${5:-1}
  local W=$BASE/$F-$Z-$M${6:-}
  mkdir -p "$W"
  $PY -c "from sa2va_demo.v2.training import make_base; make_base('$F', '$W/base_$F')" >"$W/make_base.log" 2>&1
  local extra=()
  [ "$M" = none ] && extra=(model.modules_to_save=None)
  local t0=$SECONDS
  (cd "$W" && PRESET_DEVICE=$PRESET timeout "${LAUNCH_TIMEOUT:-300}" $PY -m torch.distributed.run --nproc_per_node 2 \
     --master_port "$PORT" /tmp/gpu_launch.py "$REPO/tests/dist_launch.py" "$REPO/configs/sa2va_v2_tiny.py" \
     --launcher pytorch --work-dir "$W/wd" --deepspeed "$REPO/tests/assets/ds_${Z}_${DSSUF}.json" \
     --cfg-options model.family=$F model.root=$W custom_hooks.1.converter.hf_code_dir=$REPO/sa2va_demo/v2/$(hf_dir $F) \
     env_cfg.dist_cfg.backend=$BACKEND "${extra[@]}") >"$W/launch.log" 2>&1
  echo "$? $((SECONDS - t0))" >"$W/rc"
}

check() {  # family zero mts [suffix]
  local F=$1 Z=$2 M=$3 W=$BASE/$1-$2-$3${4:-}
  export HF_MODULES_CACHE=$W/hf_modules
  read -r rc secs <"$W/rc"
  echo ""
  echo "### $F $Z modules_to_save=$M: launch rc=$rc (${secs}s)"
  grep -a "\[gpu_check\]" "$W/launch.log" | sed 's/^/  /'
  grep -a "\[sa2va_hooks\]" "$W/launch.log" | sed 's/^.*\[sa2va_hooks\]/  [sa2va_hooks]/' | cut -c1-400
  if [ "$rc" != 0 ]; then
    echo "  first error lines:"
    grep -a -n -E "Error|error:|Traceback|FAILED|Duplicate GPU|NCCL WARN" "$W/launch.log" | grep -v error_file | head -12 \
      | cut -c1-400 | sed 's/^/    /'
  fi
  for it in 2 4; do
    if [ -d "$W/wd/hf/iter_$it" ]; then
      local v
      v=$($PY -m sa2va_hooks verify "$W/wd/hf/iter_$it" --load 2>&1; echo "rc=$?")
      echo "  verify --load iter_$it: $(echo "$v" | grep -v -e "^\[20" -e kernels-community | tail -5 | tr '\n' ' ')"
    else
      echo "  verify iter_$it: no snapshot"
    fi
  done
  [ -d "$W/wd/hf/iter_4" ] || return 0
  $PY - "$W" "$F" "$Z" "$M" <<'EOF' 2>&1 | grep -a "^  "
import sys, traceback
from pathlib import Path
import torch
W, F, Z, M = Path(sys.argv[1]), *sys.argv[2:]
snap = W / "wd" / "hf" / "iter_4"
try:
    from transformers import AutoModel
    _, info = AutoModel.from_pretrained(str(snap), trust_remote_code=True, output_loading_info=True)
    counts = [len(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")]
    print(f"  from_pretrained(trust_remote_code) iter_4: missing/unexpected/mismatched = {counts[0]}/{counts[1]}/{counts[2]}")
except Exception:  # noqa: BLE001
    print("  from_pretrained FAILED:\n" + "\n".join("    " + l for l in traceback.format_exc().splitlines()[-8:]))
try:  # the test's comparison: Sa2VA's own procedure on the model rebuilt from the run's iter_4 checkpoint
    sys.path.insert(0, "tests")
    from mmengine.runner import set_random_seed
    from test_sa2va_v2 import official_reference, written
    from sa2va_demo.v2.training import N_WORDS, Sa2VAModelV2
    from sa2va_hooks.offline import extract_state_dict, load_checkpoint
    ckpt = W / "wd" / "iter_4.pth"
    state = extract_state_dict(load_checkpoint(ckpt), ckpt)
    set_random_seed(0)
    model = Sa2VAModelV2(F, str(W), **({"modules_to_save": None} if M == "none" else {}))
    res = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bad = list(res.unexpected_keys) + sorted(trainable & set(res.missing_keys))
    # Sa2VA's procedure run on the CPU (as the CPU test does) and, on a GPU machine, on the GPU (the
    # hook merges LoRA on the device the parameters are on)
    for where in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]):
        _, expected = official_reference(model.to(where))
        expected = {k: v.detach().cpu() for k, v in expected.items()}
        got = written(snap)
        if M == "none":  # frozen resized rows drawn under ZeRO-3 partitioning at build: compare base rows
            rows = 4 + N_WORDS
            for k in [k for k in expected if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:
                if k in got:
                    got[k], expected[k] = got[k][:rows], expected[k][:rows]
        same_keys = sorted(got) == sorted(expected)
        diff = [k for k in expected if k in got and not torch.equal(got[k], expected[k])]
        worst = max(((got[k].double() - expected[k].double()).abs().max().item() for k in diff), default=0.0)
        print(f"  vs official procedure (merge on {where}) on rebuilt iter_4 checkpoint: checkpoint keys landed={not bad} "
              f"same keys={same_keys} ({len(got)} tensors) unequal={len(diff)} max|diff|={worst:.3g} {diff[:2]}")
except Exception:  # noqa: BLE001
    print("  official comparison FAILED:\n" + "\n".join("    " + l for l in traceback.format_exc().splitlines()[-8:]))
EOF
}

CASES=${CASES:-"internvl:zero2:v2 qwen2_5_vl:zero2:v2 qwen3_vl:zero2:v2 internvl:zero3:v2 qwen2_5_vl:zero3:v2 qwen3_vl:zero3:v2 internvl:zero3:none qwen2_5_vl:zero3:none qwen3_vl:zero3:none"}
port=29600
for group in zero2:v2 zero3:v2 zero3:none; do
  mine=()
  for c in $CASES; do
    IFS=: read -r F Z M <<<"$c"
    [ "$Z:$M" = "$group" ] && mine+=("$F:$Z:$M")
  done
  [ ${#mine[@]} -gt 0 ] || continue
  if [ $SECONDS -gt "${STOP_AFTER:-450}" ]; then say ""; say "== skipped (time): ${mine[*]}"; continue; fi
  pids=()
  for c in "${mine[@]}"; do
    IFS=: read -r F Z M <<<"$c"
    launch "$F" "$Z" "$M" $port & pids+=($!)
    port=$((port + 1))
  done
  wait "${pids[@]}"
  pids=()
  for c in "${mine[@]}"; do
    IFS=: read -r F Z M <<<"$c"
    check "$F" "$Z" "$M" >"$BASE/$F-$Z-$M/check.txt" 2>&1 & pids+=($!)
  done
  wait "${pids[@]}"
  for c in "${mine[@]}"; do
    IFS=: read -r F Z M <<<"$c"
    tee -a "$SUMMARY" <"$BASE/$F-$Z-$M/check.txt"
  done
  (cd "$BASE" && tar czf "$OUT/logs.tar.gz" */launch.log */rc */make_base.log */check.txt 2>/dev/null)
done

if [ "$MODE" = cuda ] && [ "${PROBE_NO_PRESET:-1}" = 1 ] && [ $SECONDS -lt "${STOP_AFTER:-450}" ]; then
  say ""
  say "== probe: internvl zero2 with tests/dist_launch.py alone (its set_device no-op in force, no pre-set device)"
  LAUNCH_TIMEOUT=${PROBE_TIMEOUT:-100} launch internvl zero2 v2 $port 0 -nopreset
  check internvl zero2 v2 -nopreset 2>&1 | tee -a "$SUMMARY"
fi

say ""
say "== done in ${SECONDS}s"
(cd "$BASE" && tar czf "$OUT/logs.tar.gz" */launch.log */rc */make_base.log */check.txt 2>/dev/null)
ls -la "$OUT"
