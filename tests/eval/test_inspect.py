import copy

from mquant.api import quantize
from mquant.config import recipe_for
from mquant.eval.inspect import describe
from mquant.models.registry import get_adapter
from mquant.testing.tiny import tiny_case


def test_describe_before_and_after_quantization():
    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    info = describe(model, get_adapter(model))
    assert info["family"] == "qwen2_vl" and info["position_scheme"] == "mrope3d"
    assert info["vision"]["blocks"] == len(model.model.visual.blocks)
    assert info["quantized_layers"] == 0 and info["recipe"] is None
    quantize(model, recipe_for("rtn", "w8a8"), [case.batch(batch_size=1, seed=0)])
    after = describe(model, get_adapter(model))
    expected = info["vision"]["linears"] + len(info["projector"]["linears"]) + info["language"]["linears"]
    assert after["quantized_layers"] == expected and after["recipe"]["method"] == "rtn"
