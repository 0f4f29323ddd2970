import json
import os
import subprocess
import sys

import pytest

from mquant.config import MQUANT_STEPS
from mquant.eval.ablation import ablation_recipes, baseline_recipes


def test_ablation_rows_add_one_component_at_a_time():
    rows = dict(ablation_recipes("w4a8"))
    assert list(rows)[:4] == ["rtn", "smoothquant", "gptq", "quarot"] and list(rows)[-1] == "mquant"
    assert rows["quarot"].language.act_dynamic and not rows["mquant"].language.act_dynamic
    assert all(not r.language.act_dynamic for name, r in rows.items() if name != "quarot")
    steps = [set(r.step_names) for name, r in rows.items() if name.startswith("+")]
    assert all(a < b for a, b in zip(steps, steps[1:])) and steps[-1] == set(MQUANT_STEPS)
    # the default adds the first-token scale and MSE clipping to the paper's full recipe (`+rms`)
    assert set(rows["mquant"].step_names) == set(MQUANT_STEPS) and rows["mquant"].step("msq").first_token
    assert rows["mquant"].observer == "mse" and rows["+rms"].observer == "minmax" and not rows["+rms"].step("msq").first_token
    assert [n for n, _ in baseline_recipes("w8a8")] == ["rtn", "rtn-dynamic", "gptq", "gptq-dynamic"]


@pytest.mark.slow
def test_demo_runs_on_the_default_model():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "mquant.cli", "demo", "--limit", "12", "--n-calib", "2", "--json"],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {r["name"]: r for r in payload["rows"]}
    assert set(rows) == {"float", "mquant"}
    assert 0 <= rows["mquant"]["accuracy"] <= 1 and rows["mquant"]["kl"] >= 0
    assert rows["mquant"]["weight_bytes"] < 0.5 * rows["float"]["weight_bytes"]
