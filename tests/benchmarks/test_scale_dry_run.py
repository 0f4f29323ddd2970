"""`python benchmarks/scale.py --dry-run`: the scale benchmark's in-memory (2B-shaped) and streamed,
RLIMIT-capped (7B-shaped) paths at toy size, so the real-size command is known to run to the end."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"float edits before calibration", "weight solves (GPTQ)", "vision blocks", "projector", "language blocks", "save"}


def test_dry_run_times_every_stage_of_both_paths(tmp_path):
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/scale.py"), "--dry-run", "--threads", "1", "--work", str(tmp_path / "w"),
                          "--json", str(out)], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert STAGES <= set(runs["2b"]["stages"])
    assert runs["7b"]["ok"], runs["7b"].get("error")
    assert STAGES | {"block loading (disk)"} <= set(runs["7b"]["stages"])
    for r in runs.values():
        assert r["visual_tokens_per_sample"] == 256 and r["output_bytes"] > 0 and r["peak_rss_bytes"] > 0
        assert r["stages"]["vision blocks"]["calls"] == 2 and r["stages"]["language blocks"]["calls"] == 2
    assert runs["7b"]["budget_bytes"] > 0 and (tmp_path / "w" / "7b" / "quantized").is_dir()
