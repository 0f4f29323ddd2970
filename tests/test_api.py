"""End to end on tiny instances of every family's real transformers class: vision tower, projector
and language model all quantized, with RTN and GPTQ, static and dynamic activations."""

import copy

import pytest
import torch

from mquant.api import quantize
from mquant.config import CalibConfig, recipe_for
from mquant.core.qlinear import QuantLinear
from mquant.core.swap import quant_linears
from mquant.errors import CalibrationError, ConfigError, UnsupportedModelError
from mquant.testing.tiny import TEXT_FAMILIES, TINY_FAMILIES, tiny_case

FAMILIES = TINY_FAMILIES + ("llava_dinov2", "smolvlm") + TEXT_FAMILIES


def _relative_error(model, batch, ref):
    with torch.no_grad():
        out = model(**batch).logits
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request):
    case = tiny_case(request.param)
    samples = [case.batch(batch_size=1, seed=i) for i in range(4)]
    batch = case.batch(batch_size=2, seed=100)
    with torch.no_grad():
        ref = case.model(**batch).logits
    return case, samples, batch, ref


@pytest.mark.parametrize("act", ["static", "dynamic"])
def test_error_shrinks_from_w4a8_to_w8a8_and_gptq_beats_rtn(family_case, act):
    case, samples, batch, ref = family_case
    errors, layer_errors = {}, {}
    for method in ("rtn", "gptq"):
        for scheme in ("w4a8", "w8a8"):
            model = copy.deepcopy(case.model)
            report = quantize(model, recipe_for(method, scheme, act), samples)
            layers = quant_linears(model)
            assert layers and all(m.quantized for m in layers.values())
            parts = {"language"} if case.family in TEXT_FAMILIES else {"vision", "projector", "language"}
            assert {r.part for r in report.layers} == parts
            errors[method, scheme] = _relative_error(model, batch, ref)
            layer_errors[method, scheme] = sum(r.output_error for r in report.layers) / len(report.layers)
    for method in ("rtn", "gptq"):
        assert errors[method, "w8a8"] < errors[method, "w4a8"], errors
    assert layer_errors["gptq", "w4a8"] < layer_errors["rtn", "w4a8"], layer_errors


def test_every_spec_linear_is_quantized(family_case):
    case, samples, _, _ = family_case
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w8a8"), samples[:1])
    from mquant.models.registry import get_adapter

    spec = get_adapter(model).validate(model)
    assert all(isinstance(ref.module, QuantLinear) and ref.module.quantized for _, ref in spec.all_linears())


def test_mixed_schemes_vision_w8a8_language_w4a8():
    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w4a8", vision_scheme="w8a8"), [case.batch(batch_size=1, seed=0)])
    bits = {m.modality: m.weight_bits for m in quant_linears(model).values()}
    assert bits == {"vision": 8, "projector": 8, "language": 4}


def test_weight_only_scheme_keeps_activations_float():
    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("gptq", "w4a16", group_size=16), [case.batch(batch_size=1, seed=0)])
    layer = next(iter(quant_linears(model).values()))
    assert layer.act_bits is None and layer.w_scale.shape[1] == layer.in_features // 16


def test_empty_and_text_only_calibration_fail_clearly():
    case = tiny_case("qwen2_vl")
    with pytest.raises(CalibrationError, match="empty"):
        quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8"), [])
    text_only = case.batch(batch_size=2, seed=0, text_only_row=True)
    text_only = {"input_ids": text_only["input_ids"][-1:], "attention_mask": text_only["attention_mask"][-1:]}
    with pytest.raises(CalibrationError, match="no image"):
        quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8"), [text_only])
    with pytest.raises(CalibrationError, match="does not exist"):
        quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8"), CalibConfig(source="/nonexistent/calib.jsonl"), processor=object())


def test_bad_bit_width_and_unknown_model():
    with pytest.raises(ConfigError, match="bit width"):
        recipe_for("rtn", "w3a8")
    with pytest.raises(ConfigError, match="activation bit width"):
        recipe_for("rtn", "w8a4")
    with pytest.raises(UnsupportedModelError):
        quantize(torch.nn.Linear(4, 4), recipe_for("rtn", "w8a8"), [{}])
