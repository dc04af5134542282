#!/usr/bin/env bash
# The second, short GPU call of issue 13 (docs/GPU.md): after the first full check (scripts/gpu_check.sh) on an
# H200, re-run what it left failed or unfinished, with the fixes made since, and look inside the slow op.
#
#   bash scripts/gpu_recheck.sh            # on the GPU machine; every log lands in $OUT (or gpu_recheck_out/)
#   bash scripts/gpu_recheck.sh --dry-run  # the same steps on CPU at toy sizes
#
# Steps, in priority order (a call cut short still returns the logs of those that ran; the 2026-11-28 session ran
# an earlier order, edge first, and found edge passing and rest too slow for its 90 s):
#   rest      the GPU tests that call 1's 240 s limit cut off (checkpoints, bitwise resume, convert)
#   triton    the hand-written Triton kernels (kernel mode triton, added 2026-11-30 after the second GPU session):
#             tests/test_gpu.py's cuda-triton cases, every op against float64 in three dtypes, edge cases, gradcheck,
#             autocast, channels_last (they compiled for sm_90 on the CPU machine: scripts/triton_aot.py)
#   profile   scripts/profile_op.py --triton --cprofile: host vs device time of fused SALU+SWALU on the compiled path
#             and on the hand-written Triton kernels (launched directly, and through Triton's launcher: the host-time
#             fix of the seventh session) beside BN+ReLU, and cProfile's table of each one's host time by function
#             (--forms, the compiled path's two forms, was measured by the third GPU session and left out)
#   models    eager models on the Triton kernels (SALUNET_KERNELS=triton salunet bench models, bf16, channels_last,
#             batch 128): the compiled path's per-call host cost held eager SaluNets to 0.24-0.40x their twins' training
#             images/s (2026-11-28); whole compiled models are unaffected (their math is traced inline)
#   ops_bf16  salunet bench ops --dtype bf16 (with the Triton kernels' rows on CUDA)
#   pin_cost  the per-step pin inside the compiled model (pin_in_forward, added after the 2026-11-30 session):
#             scripts/recal_cost.py --compile, the step's cost with the pin as the trainer now does it (module)
#             against the hooks' uncompiled forward it did before (forward)
#   pin_test  its CUDA tests (inductor, bf16, channels_last; alone and with each site's all-reduce in a one-rank
#             NCCL group, as under DDP), compilations of their own: a step apart, so that a slow compile cannot cost
#             the measurement; and salunet.SaluPin's (a compiled bf16 loop of one's own, tenth session)
#   ops_fp32  salunet bench ops --dtype fp32, re-measured after the host-time fix (d0db3ce)
#   edge      tests/test_gpu.py's edge cases on CUDA (failed in call 1, passed in call 2)
# GPU_RECHECK_STEPS picks a subset (comma-separated; default all), e.g. profile,ops_bf16,ops_fp32 when the GPU tests
# ran beside the training (gpu_check.sh with GPU_CHECK_PARALLEL=1).
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
R=${OUT:-gpu_recheck_out}
mkdir -p "$R"
export PYTHONUNBUFFERED=1
T0=$SECONDS
# a subset, in this file's order
WANT=",${GPU_RECHECK_STEPS:-rest,triton,profile,models,ops_bf16,pin_cost,pin_test,ops_fp32,edge},"
for s in ${WANT//,/ }; do
  [[ ",rest,triton,profile,models,ops_bf16,pin_cost,pin_test,ops_fp32,edge," == *",$s,"* ]] || {
    echo "GPU_RECHECK_STEPS: unknown step '$s'; use rest, triton, profile, models, ops_bf16, pin_cost, pin_test," \
      "ops_fp32, edge" >&2
    exit 2; }
done
run() {  # run NAME LIMIT CMD...
  local name=$1 limit=$2; shift 2
  [[ "$WANT" == *",$name,"* ]] || { echo "[$((SECONDS - T0))s] $name: skipped (not in GPU_RECHECK_STEPS)"; return; }
  echo "[$((SECONDS - T0))s] $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >"$R/$name.log" 2>&1
  echo "[$((SECONDS - T0))s] $name: rc=$?"
  tail -n 3 "$R/$name.log" | sed 's/^/    /'
}
if ((DRY)); then
  DEV=cpu; K="cpu"; SHAPE=8,64,16,16; OPS=(--device cpu --batch 2 --cases tokens --repeats 1 --warmup 1)
  PIN=(--device cpu --width 2 --batch 4 --size 8 --steps 1 --repeats 1)  # uncompiled: inductor on CPU takes minutes
  MODELS=(--device cpu --batch 2 --repeats 1 --warmup 1 --pairs "resnet18 cpu-width"); MODES=auto  # no Triton on CPU
else
  DEV=cuda; K="cuda"; SHAPE=256,64,32,32; OPS=(--device cuda --repeats 10)
  PIN=(--device cuda --width 64 --batch 128 --steps 10 --repeats 5 --compile)
  MODELS=(--device cuda --batch 128 --channels-last --repeats 5 --dtype bf16 --pairs "resnet18 full,vit full")
  MODES=triton
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$R/install.log" 2>&1
fi
skipped() { echo "[$((SECONDS - T0))s] $1: skipped (dry run: tests/test_gpu.py's cpu twins run in the test suite)"; }
if ((DRY)); then skipped rest; else
  run rest 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py --tb=short -rA \
    -k "$K and (checkpoint or resume or convert)"
fi
if ((DRY)); then skipped triton; else
  run triton 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k cuda-triton --tb=short -rA
fi
run profile 75 "$PY" scripts/profile_op.py --device "$DEV" --shape "$SHAPE" --iters 20 --triton --cprofile --rows 22
run models 150 env SALUNET_KERNELS=$MODES "$PY" -m salunet bench models "${MODELS[@]}" --out "$R"
run ops_bf16 120 "$PY" -m salunet bench ops "${OPS[@]}" --dtype bf16 --out "$R"
run pin_cost $(( DRY ? 120 : 200 )) "$PY" scripts/recal_cost.py "${PIN[@]}" --every 1 --measure forward,module
if ((DRY)); then skipped pin_test; else
  run pin_test 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "pin_in_forward or salupin" --tb=short -rA
fi
run ops_fp32 120 "$PY" -m salunet bench ops "${OPS[@]}" --dtype fp32 --out "$R"
if ((DRY)); then skipped edge; else
  run edge 70 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "$K and edge_cases" --tb=short -rA
fi
echo "[$((SECONDS - T0))s] done"
