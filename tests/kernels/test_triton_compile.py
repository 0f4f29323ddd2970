"""Every Triton kernel variant the backend launches builds for Hopper (sm_90a) with at most a few
registers spilled, using wgmma / mma: what the CPU interpreter cannot check.  Compiles ahead of
time (no GPU, no driver) in a subprocess, since the kernels here are loaded in interpreter mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mquant.kernels import triton_gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not triton_gpu.triton_installed(), reason="triton not installed")
def test_kernels_build_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/compile_check.py"), "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"qgemm_kernel", "hadamard_kernel", "absmax_scale_kernel", "quantize_kernel"}
    gemms = [r for r in rows if r["kernel"] == "qgemm_kernel"]
    assert len(gemms) >= 16 and all(r["cp_async"] for r in gemms)  # weight tiles pipelined
    assert any(r["mma"] == "wgmma" for r in gemms)
