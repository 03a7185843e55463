#!/usr/bin/env bash
# The device check: one unattended script, under 10 minutes on one GPU or a TPU VM, for the short
# time an accelerator is lent.
#
#   benchmarks/gpu_check.sh                  # on a GPU machine: installs the CUDA extra, then measures
#   benchmarks/gpu_check.sh --tpu            # on a TPU VM: installs the tpu extra, then measures
#   benchmarks/gpu_check.sh --no-install     # CUDA/TPU JAX (and torch) already installed / no network
#   benchmarks/gpu_check.sh --dry-run        # every stage at tiny sizes on whatever JAX finds (CPU)
#   benchmarks/gpu_check.sh --dry-run --tpu  # the same, planning for a TPU slice where libtpu is installed
#
# Stages (each writes under OUT, default benchmarks/results/gpu_check/; a failing stage is reported
# and the next one still runs, so one bad stage costs none of the others' figures):
#   1. devices     nvidia-smi, and what JAX sees (backend, devices: diffseg's start-of-job line)
#   2. plans       diffseg plan of the paper's 3D and 2D prostate steps compiled by XLA for this card
#                  or slice (the real devices) and, where the CUDA plugin (GPU) or libtpu (TPU) is
#                  installed, for the named target without the device (--target), to compare the
#                  deviceless plan with the real one
#   3. steps       training's own step (micro-batch auto, bf16, recycling) on this device: s/step,
#                  TFLOP/s, MFU against the card's peak, peak memory against the plan
#                  (benchmarks/gpu_check.py), 3D and 2D
#   4. pytorch     the same network and loss in PyTorch on the same device, at the paper's 3D and 2D
#                  steps (benchmarks/train_step.py: JAX vs PyTorch speed ratio, FLOP utilisation);
#                  GPU only
#   5. workflow    a short paper-shaped phantom run through Snakemake with the GPU (TPU) profile
#                  (data, train, test), each job claiming its own GPU (its TPU chips)
# Then OUT/summary.txt holds the last line of each stage.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
INSTALL=1
TPU=0
OUT=benchmarks/results/gpu_check
TARGET=${DIFFSEG_GPU_TARGET:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; INSTALL=0 ;;
    --tpu) TPU=1 ;;
    --no-install) INSTALL=0 ;;
    --out) OUT=$2; shift ;;
    --target) TARGET=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --tpu, --no-install, --out DIR, --target CARD)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
FAILED=0

stage() {  # stage NAME COMMAND...: run, log to OUT/NAME.log, keep its last line in the summary
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$SUMMARY"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$OUT/$name.log" | sed "s/^/   $name: /" | tee -a "$SUMMARY"
  echo "   $name: exit $rc after $(( SECONDS - start )) s" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=$(( FAILED + 1 ))
}

if [ "$INSTALL" -eq 1 ]; then
  if [ "$TPU" -eq 1 ]; then EXTRAS="tpu"; else EXTRAS="cuda12,benchmark"; fi
  stage install "$PY" -m pip install -q -e ".[$EXTRAS]"
fi

if [ "$DRY" -eq 1 ]; then
  # Tiny: the demo's phantom and a small network, on the CPU; the same code paths as the real check.
  CONFIG=config/config.yaml; DATASET=phantom_pelvis
  SMALL=(--set "model.channels=[4,8]" --set train.batch_size=2)
  # A TPU slice splits the batch over its 8 (or 4) devices: one volume each.
  [ "$TPU" -eq 1 ] && SMALL=(--set "model.channels=[4,8]" --set train.batch_size=8)
  STEP3=(--shape 48 48 16 --batch 2 --channels 4 8); STEP2=(--shape 48 48 --batch 32 --channels 4 8)
  TIMED=(--steps 2 --warmup 0); REPEATS=(--repeats 1 --warmup 1)
else
  CONFIG=config/paper.yaml; DATASET=prostate_mr
  SMALL=()
  STEP3=(--shape 256 256 48 --batch 8); STEP2=(--shape 256 256 --batch 384)  # 8 volumes = 384 slices
  TIMED=(--steps 5 --warmup 1); REPEATS=(--repeats 5 --warmup 2)
fi

devices() {
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  "$PY" -c "import jax; from diffseg.accelerators.backend import describe_devices as d; print(d(jax.local_devices(), jax.default_backend()))"
}
stage devices devices

# What this card or slice is, for the deviceless plan: DIFFSEG_GPU_TARGET/--target, else a known
# card by name, or the known TPU slice of this many devices of this kind.
if [ -z "$TARGET" ]; then
  TARGET=$("$PY" -c "
import jax
from diffseg.accelerators.targets import target_for_device
d = jax.local_devices()
t = target_for_device(d[0].device_kind, len(d))
print(t.name if t else '')" 2> /dev/null || true)
fi
if [ "$DRY" -eq 1 ] && [ -z "$TARGET" ]; then
  if [ "$TPU" -eq 1 ]; then TARGET=tpu-v3-8; else TARGET=h100-80gb; fi
fi
# The deviceless plan needs the target's compiler: jax's CUDA plugin for a card, libtpu for a slice.
case "$TARGET" in tpu-*) COMPILER=libtpu ;; *) COMPILER=jax_plugins.xla_cuda12 ;; esac
HAS_PLUGIN=$("$PY" -c "import importlib.util as u; print(int(u.find_spec('$COMPILER') is not None))" 2> /dev/null || echo 0)

for run in 3d-diff 2d-diff; do
  stage "plan_$run" diffseg plan --configfile "$CONFIG" --dataset "$DATASET" --run "$run" "${SMALL[@]}" \
    --json "$OUT/plan_${run}_device.json"
  if [ -n "$TARGET" ] && [ "$HAS_PLUGIN" = 1 ]; then
    stage "plan_${run}_target" diffseg plan --configfile "$CONFIG" --dataset "$DATASET" --run "$run" \
      "${SMALL[@]}" --target "$TARGET" --json "$OUT/plan_${run}_${TARGET}.json"
  else
    echo "== plan_${run}_target: skipped (target '${TARGET}', its compiler $COMPILER installed: $HAS_PLUGIN)" | tee -a "$SUMMARY"
  fi
  stage "step_$run" "$PY" benchmarks/gpu_check.py --configfile "$CONFIG" --dataset "$DATASET" --run "$run" \
    "${SMALL[@]}" "${TIMED[@]}" --out "$OUT/step_${run}.json"
done

HAS_TORCH=$("$PY" -c "import importlib.util as u; print(int(u.find_spec('torch') is not None))")
TORCH=(); [ "$HAS_TORCH" = 1 ] || TORCH=(--skip-torch)
if [ "$TPU" -eq 1 ]; then  # PyTorch's TPU route (torch_xla) is not the comparison diffseg makes
  echo "== pytorch: skipped on a TPU" | tee -a "$SUMMARY"
else
  stage pytorch_3d "$PY" benchmarks/train_step.py "${STEP3[@]}" --bf16 --recycle --skip-xla "${TORCH[@]}" \
    "${REPEATS[@]}" --out "$OUT/train_step_3d.json"
  stage pytorch_2d "$PY" benchmarks/train_step.py "${STEP2[@]}" --bf16 --recycle --skip-xla "${TORCH[@]}" \
    "${REPEATS[@]}" --out "$OUT/train_step_2d.json"
fi

# A short phantom run through the workflow with the GPU (TPU) profile: the rehearsal's paper-shaped
# pelvis phantom (the demo's in the dry run), 3D diff to its test metrics, each job on its own GPU
# (on a TPU VM, the paper's layout: each job on the whole slice, one at a time).
WORK="$OUT/workflow"
mkdir -p "$WORK"
if [ "$TPU" -eq 1 ]; then
  PROFILE=tpu; DEVICES="tpu: all"
else
  PROFILE=gpu; DEVICES="gpu: 1"
fi
if [ "$DRY" -eq 1 ]; then
  BASE_CONFIG=config/config.yaml; PHANTOM=phantom_pelvis
  cat > "$WORK/overlay.yaml" << EOF
results: $WORK/results
training: {train: {steps: 2, checkpoint_every: 2, log_every: 1}, model: {channels: [4, 8]}}
compute: {train: {$DEVICES, threads: 1}, test: {$DEVICES, threads: 1}}
EOF
else
  BASE_CONFIG=config/rehearsal.yaml; PHANTOM=phantom_pelvis
  cat > "$WORK/overlay.yaml" << EOF
results: $WORK/results
training:
  model: {channels: [32, 64, 128, 256], remat: auto}
  train: {steps: 40, checkpoint_every: 20, log_every: 10, micro_batch: auto, platform: accelerator}
compute: {train: {$DEVICES, threads: 4}, test: {$DEVICES, threads: 4}}
EOF
fi
stage workflow snakemake "$WORK/results/runs/$PHANTOM/3d-diff/test/metrics.csv" --snakefile "$PWD/Snakefile" \
  --directory "$WORK" --workflow-profile "$PROFILE" --cores all --configfile "$PWD/$BASE_CONFIG" "$WORK/overlay.yaml"
cp "$WORK/results/runs/$PHANTOM/3d-diff/train_log.csv" "$OUT/workflow_train_log.csv" 2> /dev/null || true

echo "gpu_check: $FAILED stage(s) failed; summary in $SUMMARY" | tee -a "$SUMMARY"
[ "$FAILED" -eq 0 ]
