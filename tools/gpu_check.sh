#!/usr/bin/env bash
# GPU readiness check for neurolm_nb (nbs/52_bench.ipynb, section "GPU check"), on one CUDA GPU in under
# five minutes:
#   1. pytest -m gpu                      the CUDA-marked tests (fixture parity on the GPU, compiled
#                                         FlexAttention vs SDPA forward + backward, seeded generation)
#   2. NeuroLM-B stage-2 step, 1024 EEG tokens, bf16, SDPA and FlexAttention: tokens/s, peak memory, MFU,
#      and each loss within $LOSS_RTOL (relative) of a float32 SDPA run of the same model and batch
#   3. the stage-1 tokenizer step at full width, bf16: the same numbers and the same loss check
# Usage (from anywhere):
#   tools/gpu_check.sh              on the GPU machine; fails at once, saying why, without CUDA
#   tools/gpu_check.sh --dry-run    the same three stages on the CPU at tiny sizes (a rehearsal; the GPU
#                                   tests skip, and naive attention stands in for FlexAttention, which has no
#                                   backward on a CPU)
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_OUT (JSON results; default
# runs/gpu_check), NEUROLM_PEAK_TFLOPS (peak for the MFU of a GPU the bench's table does not know),
# LOSS_RTOL (default 1e-2), T_TESTS / T_LM / T_TOK (each stage's time cap in seconds, default 130 / 110 / 60),
# CUDA_VISIBLE_DEVICES (which GPU).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run|--cpu) DRY_RUN=1 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
LOSS_RTOL=${LOSS_RTOL:-1e-2}
mkdir -p "$OUT"

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

if [ "$DRY_RUN" = 0 ]; then
    command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: no NVIDIA driver on this machine. \
This check needs one CUDA GPU; for the CPU rehearsal run: tools/gpu_check.sh --dry-run"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || fail "nvidia-smi sees no GPU (driver not loaded, or no device visible)"
    "$PY" - <<'EOF' || fail "torch.cuda.is_available() is False: this torch cannot use the GPU (a CPU-only build, \
or a CUDA build newer than the driver); see the line above"
import sys, torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() = {ok}"
      + (f", {torch.cuda.device_count()} device(s), using {torch.cuda.get_device_name(0)}" if ok else ""))
sys.exit(0 if ok else 1)
EOF
    DEVICE=cuda
    IMPLS="sdpa flex"
    # NeuroLM-B: GPT-2 small (12 x 768) on the 12 x 768 encoder, 1024 tokens = 16 channels x 64 s, batch 8
    LM_SIZES=(--seq 1024 --channels 16 --batch 8 --steps 3 --warmup 1)
    TOK_SIZES=(--seq 1024 --channels 16 --batch 8 --steps 3 --warmup 1)
    T_TESTS=${T_TESTS:-130}; T_LM=${T_LM:-110}; T_TOK=${T_TOK:-60}   # caps summing to the 5-minute budget
else
    echo "gpu_check: DRY RUN on the CPU at tiny sizes (the same stages and code path; no GPU numbers)"
    DEVICE=cpu
    IMPLS="sdpa naive"
    LM_SIZES=(--layers 1 --width 64 --heads 2 --encoder-layers 1 --encoder-width 64 --encoder-heads 2
              --seq 64 --channels 16 --batch 1 --steps 1 --warmup 1 --threads 1)
    TOK_SIZES=(--encoder-layers 1 --decoder-layers 1 --encoder-width 64 --encoder-heads 2 --seq 64 --channels 16
               --batch 1 --text-batch 2 --text-block 32 --steps 1 --warmup 1 --threads 1)
    T_TESTS=300; T_LM=300; T_TOK=300
fi

START=$SECONDS
declare -A STATUS
stage() {  # stage NAME TIMEOUT_S COMMAND...: run, time, remember the verdict
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | awk '!/^\{"results"/'   # the bench's JSON line goes to $OUT, not the log
    local rc=${PIPESTATUS[0]}
    [ $rc = 124 ] && echo "gpu_check: $name ran past ${limit}s" >&2
    STATUS[$name]="$([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
    echo "=== $name: ${STATUS[$name]}"
}

stage "1 gpu tests" "$T_TESTS" "$PY" -m pytest -m gpu -q
# IMPLS: sdpa flex on the GPU; naive stands in on the CPU (FlexAttention has no backward there)
stage "2 stage-2 step (bf16)" "$T_LM" "$PY" -m neurolm_nb.bench --model lm --device "$DEVICE" --dtype bf16 \
    --impls $IMPLS --loss-check "$LOSS_RTOL" --json "$OUT/lm.json" "${LM_SIZES[@]}"
stage "3 tokenizer step (bf16)" "$T_TOK" "$PY" -m neurolm_nb.bench --model tokenizer --device "$DEVICE" \
    --dtype bf16 --loss-check "$LOSS_RTOL" --json "$OUT/tokenizer.json" "${TOK_SIZES[@]}"

echo; echo "gpu_check summary ($([ "$DRY_RUN" = 1 ] && echo "dry run, cpu" || echo cuda), $((SECONDS - START)) s in all; \
results in $OUT/):"
RC=0
for name in "1 gpu tests" "2 stage-2 step (bf16)" "3 tokenizer step (bf16)"; do
    echo "  $name: ${STATUS[$name]}"
    case "${STATUS[$name]}" in ok*) ;; *) RC=1 ;; esac
done
[ $((SECONDS - START)) -gt 300 ] && echo "  note: over the 5-minute budget"
exit $RC
