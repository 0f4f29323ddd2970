"""`bash benchmarks/gpu/run.sh --dry-run`: the GPU benchmark's own code paths (every per-layer
variant, the exactness checks, the end-to-end variants, the targets, the report) on CPU under
Triton's interpreter, so the script handed to a lent GPU is known to run to the end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mquant.kernels import triton_gpu

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))


@pytest.mark.skipif(not triton_gpu.triton_installed(), reason="triton not installed")
def test_dry_run_writes_complete_json_and_markdown(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "MQUANT_TEST_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from bench_gpu import DRY_LAYERS, DRY_ROWS, HAD, PLAIN, TARGETS

    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["mode"] == "dry-run" and len(result["layers"]) == len(DRY_LAYERS) * len(DRY_ROWS)
    for row in result["layers"]:
        expected = set(PLAIN) | (set(HAD) if row["hadamard"] else set())
        assert expected <= set(row), (row["layer"], row["M"])
        assert all(row[v]["us"] > 0 for v in expected)
    checked = [r for r in result["layers"] if "check" in r]
    assert len(checked) == len(DRY_LAYERS)
    for row in checked:  # int-exact GEMMs, Hadamard codes equal to fwht -> quantize up to rare ties
        assert max(v for k, v in row["check"].items() if k != "fwht_code_flips") <= 1
        assert row["check"].get("fwht_code_flips", 0) <= 0.01
    assert [r["variant"] for r in result["e2e"]] == ["fp16", "w8a8_dynamic", "mquant_w4a8_static", "mquant_w8a8_static"]
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in result["e2e"]), result["e2e"]
    assert {t["target"] for t in result["targets"]} == set(TARGETS)
    md = (tmp_path / "bench_gpu.md").read_text()
    for section in ("## Targets", "## Per layer", "## Layers with the online Hadamard", "## End to end"):
        assert section in md
    assert md.count("| llm.down_proj |") == 2 * len(DRY_ROWS) and "NO (" not in md
