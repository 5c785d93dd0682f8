#!/usr/bin/env bash
# Every GPU check of the fused loss in one go (about 8 minutes on one H100):
#   1. bench_fused_loss.py at V/tp = 151,936 (TP1) and 75,968 (one TP2 shard): the Triton
#      kernels against the torch oracle, then time and memory of naive / torch / Triton /
#      Liger-Kernel against cuBLAS GEMM bounds;
#   2. bench_train_step.py: one SDPG step of a Qwen3-0.6B-shaped model: Triton kernels, single
#      pass and naive loss, each in a process of its own
#      (train_step_needed: the same with the teacher pass on the samples with A > 0 only);
#   3. bench_forward_anatomy.py: the forward kernel's GEMM loop alone vs the whole kernel;
#   4. summarize.py: the markdown tables (summary.md).
# PARTS="fused_tp1 anatomy" runs a subset.
# Each part has its own time limit and writes its JSON as it goes, so one failing or slow
# part still leaves the others' numbers. Needs megatron-core and liger-kernel: from the
# environment, or wheels in ./.whl (installed into /tmp/site).
#
#   OUT=benchmarks/results/gpu bash benchmarks/gpu/run.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu_run}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# SDPG_TRITON_EXPERIMENTAL=1 tunes the kernels' experimental configurations (flattened
# loop) too; by default the runs time what training uses.
export SDPG_TRITON_EXPERIMENTAL=${SDPG_TRITON_EXPERIMENTAL:-0}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; date -u;
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 seconds=$2; shift 2
    local started=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
    grep -v -i "warn" "$OUT/$name.log" | tail -n 12
}
PARTS=${PARTS:-fused_tp1 fused_tp2 train_step anatomy}
for name in $PARTS; do
    case $name in
        fused_tp1) part fused_tp1 ${TP1_S:-240} "$PYTHON" benchmarks/gpu/bench_fused_loss.py --tp 1 --out "$OUT/fused_tp1.json" ;;
        fused_tp2) part fused_tp2 ${TP2_S:-180} "$PYTHON" benchmarks/gpu/bench_fused_loss.py --tp 2 --out "$OUT/fused_tp2.json" ;;
        train_step) part train_step ${STEP_S:-240} "$PYTHON" benchmarks/gpu/bench_train_step.py --out "$OUT/train_step.json" ;;
        train_step_needed) part train_step_needed ${STEP_S:-240} "$PYTHON" benchmarks/gpu/bench_train_step.py \
            --teacher-scope needed --out "$OUT/train_step_needed.json" ;;
        anatomy) part anatomy ${ANATOMY_S:-120} "$PYTHON" benchmarks/gpu/bench_forward_anatomy.py --out "$OUT/anatomy.json" ;;
        *) echo "unknown part $name (fused_tp1 fused_tp2 train_step train_step_needed anatomy)" >&2; exit 2 ;;
    esac
done
"$PYTHON" benchmarks/gpu/summarize.py "$OUT"
