#!/usr/bin/env bash
# Every default-model figure in BENCHMARKS.md, in one go; each step saves its JSON under
# benchmarks/results/ as soon as it has it (a cut-off run keeps what it measured).
# Usage: bash benchmarks/run_default_model_tables.sh [LIMIT] [N_CALIB]
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-1000}
NCAL=${2:-16}
OUT=benchmarks/results
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*"; }
log "W4A8 ablation + baselines on $LIMIT test questions"
mquant ablate --scheme w4a8 --rows all --limit "$LIMIT" --n-calib "$NCAL" --save "$OUT/ablate_w4a8.json" --json > /dev/null
log "float vs RTN / GPTQ / MQuant, W4A8 and W8A8, static and dynamic, full test split (~75 min on 2 cores)"
mquant ablate --scheme w4a8,w8a8 --rows table --limit 0 --n-calib "$NCAL" --save "$OUT/table_full.json" --json > /dev/null
log "float accuracy, full easy-VQA test split"
mquant eval --task easy-vqa --json | tail -n 1 > "$OUT/eval_float_full.json"
log "MQuant W4A8 static: quantize, then full test split on the integer kernels, and fidelity"
rm -rf /tmp/mquant-w4a8
mquant quantize --method mquant --scheme w4a8 --n-calib "$NCAL" --out /tmp/mquant-w4a8 --json | tail -n 1 > "$OUT/quantize_mquant_w4a8.json"
mquant eval /tmp/mquant-w4a8 --task easy-vqa --json | tail -n 1 > "$OUT/eval_mquant_w4a8_full.json"
log "per-layer kernels, and the cost of the fused online Hadamard"
python benchmarks/bench_linear.py --json "$OUT/bench_linear.json" > "$OUT/bench_linear.txt"
python benchmarks/bench_linear.py --shapes 576x1536 384x1536 1536x8960 --m 1 16 256 --hadamard \
    --json "$OUT/bench_hadamard.json" > "$OUT/bench_hadamard.txt"
log "end-to-end latency and memory"
mquant bench --json | tail -n 1 > "$OUT/bench_e2e.json"
log done
