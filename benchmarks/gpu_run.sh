#!/usr/bin/env bash
# One call on a GPU machine does everything, inside 8 minutes, installing nothing:
#
#   bash benchmarks/gpu_run.sh [RESULTS_FOLDER]
#
#   a. GPU-marked tests (pytest tests -m gpu)             -> gpu_tests.xml, gpu_tests.log
#   b. the memory-traffic model with the real kernels     -> traffic-*.json
#   c. kernel benchmarks, stages 1 and 3 (run_kernels.py) -> kernels.json, kernels.md
#      and the 1x1 convs, Triton vs cuBLAS + epilogue      -> conv1x1/kernels.json, .md
#   d. maxvit-bench, tiny preset, batch sweeps, fp32/bf16, inference and training
#                                                         -> bench-*.json, bench-*.png
#   e. summary.md (benchmarks/summarize.py)
#
# Results go to RESULTS_FOLDER, else benchmarks/results/<device>-<date>. When $OUT is set (the
# device runner's output folder, which returns at most 8 files), they are written to a temporary
# folder and $OUT receives <device>-<date>.tar.gz of the whole folder plus summary.md and
# steps.tsv; `tar -xzf <device>-<date>.tar.gz -C benchmarks/results` unpacks the folder to
# commit. The archive is written on every exit of the script, a failed step's too. Each step has a time limit
# (GPU_RUN_BUDGET seconds in all, default 465) and writes its JSON as it goes, so a step cut
# short still leaves its figures; steps.tsv lists each step's exit status and seconds.
#
# Needs torch (CUDA) and triton in the image. Works from the bare working tree: the package is
# put on PYTHONPATH from a temporary copy laid out as installed (kernels/ -> maxvit_fast/kernels),
# einops is replaced by benchmarks/einops_shim if it is missing, and pytest, pytest-benchmark,
# hypothesis, tqdm and matplotlib are optional (steps that need them say they were skipped).
# GPU_RUN_CPU_SMOKE=1 runs the same steps at CPU sizes on a machine without CUDA (to check the
# script itself; it measures nothing of interest).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-465}
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# --- the package, as installed, from this working tree ---------------------------------------
PKG=$(mktemp -d)
PACK_TO=""  # set when the results are packed into $OUT on exit
pack_results() {
    if [ -n "$PACK_TO" ] && [ -d "${RESULTS:-}" ]; then
        local name
        name=$(basename "$RESULTS")
        tar -C "$(dirname "$RESULTS")" -czf "$PACK_TO/$name.tar.gz" "$name" \
            && echo "gpu_run: packed $PACK_TO/$name.tar.gz (tar -xzf $name.tar.gz -C benchmarks/results)"
        for f in summary.md steps.tsv; do
            [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$PACK_TO/$f"
        done
    fi
    rm -rf "$PKG"
}
trap pack_results EXIT
cp -r maxvit_fast "$PKG/maxvit_fast"
rm -rf "$PKG/maxvit_fast/kernels"
cp -r kernels "$PKG/maxvit_fast/kernels"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
NOTES=()
if ! "$PY" -c "import einops" >/dev/null 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$ROOT/benchmarks/einops_shim"
    NOTES+=("einops is not installed: used benchmarks/einops_shim (Reduce/Rearrange for maxvit_fast's patterns)")
fi
export PYTHONUNBUFFERED=1

DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null \
    | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | tr -s '-' | sed 's/^-//; s/-$//')
DEVICE=${DEVICE:-unknown}
STAMP=$(date -u +%Y-%m-%d-%H%M)
if [ $# -ge 1 ]; then
    RESULTS=$1
elif [ -n "${OUT:-}" ]; then
    RESULTS=$PKG/results/$DEVICE-$STAMP
    PACK_TO=$OUT
else
    RESULTS=benchmarks/results/$DEVICE-$STAMP
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
echo "gpu_run: results in $RESULTS (budget ${BUDGET}s)"

SMOKE=0
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${GPU_RUN_CPU_SMOKE:-0}" != 1 ]; then
        echo "gpu_run: no CUDA device; nothing to measure (GPU_RUN_CPU_SMOKE=1 tries the script on a CPU)"
        exit 1
    fi
    SMOKE=1
    NOTES+=("CPU smoke run (GPU_RUN_CPU_SMOKE=1): tiny sizes, no fused timings; not a measurement")
fi

# --- environment --------------------------------------------------------------------------
NOTES_JSON=$(printf '%s\n' "${NOTES[@]+"${NOTES[@]}"}" \
    | "$PY" -c "import json,sys; print(json.dumps([l for l in sys.stdin.read().splitlines() if l]))")
"$PY" - "$RESULTS/env.json" "$NOTES_JSON" <<'EOF'
import datetime, importlib.util, json, sys
import torch
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
        "notes": json.loads(sys.argv[2])}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
info["modules"] = {m: importlib.util.find_spec(m) is not None
                   for m in ("einops", "pytest", "pytest_benchmark", "hypothesis", "tqdm", "matplotlib", "vit_pytorch")}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import maxvit_fast.kernels, maxvit_fast.bench" || { echo "gpu_run: maxvit_fast does not import"; exit 1; }

: > "$RESULTS/steps.tsv"
# step NAME CAP RESERVE COMMAND...: run COMMAND with a time limit of min(CAP, time left - RESERVE)
# seconds (RESERVE keeps time for the steps after it), output in NAME.log.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local limit=$(( $(left) - reserve ))
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 10 ]; then
        echo "gpu_run: $name skipped (time budget)"
        printf '%s\tskipped (time budget)\t0\n' "$name" >> "$RESULTS/steps.tsv"
        return
    fi
    echo "gpu_run: $name (limit ${limit}s, $(elapsed)s elapsed)"
    local t0
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$RESULTS/steps.tsv"
    tail -n 2 "$RESULTS/$name.log"
}

BENCH=("$PY" -m maxvit_fast.bench --preset tiny --image-size 224)
KERNEL_ARGS=(--quick)
if [ "$SMOKE" = 1 ]; then
    BENCH+=(--depth 1,1 --image-size 56 --no-compile)
    KERNEL_ARGS=(--cpu --stages 3 --batch 2)
fi

# a. GPU-marked tests
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    step gpu_tests 90 370 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
        --junitxml "$RESULTS/gpu_tests.xml"
else
    printf 'gpu_tests\tskipped (no pytest)\t0\n' >> "$RESULTS/steps.tsv"
fi

# b. the memory-traffic model with the real kernels (cheap, so early)
step traffic-bf16 25 345 "${BENCH[@]}" --traffic --dtype bf16 --batch-sizes 8 --json "$RESULTS/traffic-bf16.json"
step traffic-fp32 25 320 "${BENCH[@]}" --traffic --dtype fp32 --batch-sizes 8 --json "$RESULTS/traffic-fp32.json"

# c. kernel benchmarks (the plain runner: pytest-benchmark not needed)
step kernels 115 190 "$PY" benchmarks/run_kernels.py --out "$RESULTS" --max-seconds 85 "${KERNEL_ARGS[@]}" \
    --ops window_attention_block,window_attention_grid,mbconv_first,mbconv,feedforward
step conv1x1 45 150 "$PY" benchmarks/run_kernels.py --out "$RESULTS/conv1x1" --max-seconds 35 "${KERNEL_ARGS[@]}" \
    --ops conv1x1_expand,conv1x1_expand_stats,conv1x1_project,conv1x1_project_stats --directions fwd

# d. maxvit-bench sweeps (compiled paths run last in each, so a budget cuts them first)
step bench-infer-bf16 80 110 "${BENCH[@]}" --dtype bf16 --batch-sizes 1,8,32,128 --warmup 5 --iters 10 --repeats 5 \
    --max-seconds 50 --json "$RESULTS/bench-infer-bf16.json" --plot "$RESULTS/bench-infer-bf16.png"
step bench-infer-fp32 50 60 "${BENCH[@]}" --dtype fp32 --batch-sizes 1,32,128 --warmup 5 --iters 10 --repeats 5 \
    --paths eager,fused,fused-graph,compile --max-seconds 25 --json "$RESULTS/bench-infer-fp32.json" \
    --plot "$RESULTS/bench-infer-fp32.png"
step bench-train-bf16 45 20 "${BENCH[@]}" --train --dtype bf16 --batch-sizes 8,32 --warmup 3 --iters 5 --repeats 5 \
    --paths eager,fused,fused-graph,compile --max-seconds 20 --json "$RESULTS/bench-train-bf16.json" \
    --plot "$RESULTS/bench-train-bf16.png"
step bench-train-fp32 25 0 "${BENCH[@]}" --train --dtype fp32 --batch-sizes 8,32 --warmup 3 --iters 5 --repeats 5 \
    --paths eager,fused,fused-graph --max-seconds 10 --json "$RESULTS/bench-train-fp32.json" \
    --plot "$RESULTS/bench-train-fp32.png"

# e. summary
"$PY" benchmarks/summarize.py "$RESULTS" > "$RESULTS/summarize.log" 2>&1 || echo "gpu_run: summarize failed (see summarize.log)"
echo "gpu_run: done in $(elapsed)s; summary: $RESULTS/summary.md"
