import copy
import json

from mquant.api import quantize
from mquant.config import recipe_for
from mquant.testing.tiny import tiny_case


def test_report_files_and_contents(tmp_path):
    case = tiny_case("llava")
    model = copy.deepcopy(case.model)
    report = quantize(model, recipe_for("gptq", "w4a8"), [case.batch(batch_size=1, seed=i) for i in range(2)])
    report.write(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["summary"]) == {"vision", "projector", "language"}
    layer = data["layers"][0]
    assert layer["output_error"] > 0 and layer["weight_error"] > 0 and layer["act_scale"][0] > 0
    assert "| language |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert data["seconds"] > 0 and data["peak_memory_bytes"] > 0


def test_markdown_names_each_step_with_its_options(tmp_path):
    case = tiny_case("llava")
    model = copy.deepcopy(case.model)
    report = quantize(model, recipe_for("smoothquant", "w8a8"), [case.batch(batch_size=1, seed=0)])
    text = report.to_markdown()
    assert "- steps: smoothquant(alpha=0.5); weights: rtn;" in text
