#!/usr/bin/env bash
# The GPU benchmark of the Triton kernels, as ONE prepared run for a lent H200 (< 5 minutes):
#   bash benchmarks/gpu/run.sh               # on the device: JSON + Markdown in $OUT
#   bash benchmarks/gpu/run.sh --dry-run     # here / CI: CPU, Triton interpreter, tiny shapes (< 60 s)
#   bash benchmarks/gpu/run.sh --fetch-wheels  # here, once: wheels the device cannot download
# The device has its own CUDA torch and a triton; nothing can be downloaded there, so the one pure
# Python dependency `import mquant` needs that it lacks (easy-vqa) travels as a wheel in
# benchmarks/gpu/wheels (git-ignored; name it in the device call's `carry`).  Results: $OUT
# (default benchmarks/results/gpu, git-ignored): bench_gpu.json, bench_gpu.md, log.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
WHEELS=benchmarks/gpu/wheels
if [ "${1:-}" = "--fetch-wheels" ]; then
  "$PY" -m pip download --no-deps -d "$WHEELS" easy-vqa==1.0
  exit 0
fi
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
need() { "$PY" -c "import $1" 2>/dev/null; }
if ! need triton; then
  "$PY" -m pip install -q triton==3.9.0 || echo "warning: triton is not installed and could not be installed" >&2
fi
if ! need easy_vqa; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps "$WHEELS"/*.whl
  else
    "$PY" -m pip install -q --no-deps easy-vqa==1.0 || echo "warning: easy-vqa missing: run --fetch-wheels here first" >&2
  fi
fi
if [ "${1:-}" != "--dry-run" ]; then
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader || true
fi
set -o pipefail
"$PY" benchmarks/gpu/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
