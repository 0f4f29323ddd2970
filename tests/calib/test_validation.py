"""The held-out validation split: range overflow per layer and observer "auto" (calib/validation.py)."""

import copy

import pytest

from mquant.api import quantize
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.testing.tiny import tiny_case


@pytest.fixture(scope="module")
def case():
    return tiny_case("llava")


def _samples(case, seeds):
    return [case.batch(batch_size=1, seed=s) for s in seeds]


def test_range_overflow_is_zero_on_the_calibration_set_and_measured_on_held_out_samples(case):
    calib = _samples(case, range(3))
    on_calib = quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8"), calib, validation=calib)
    static = [r for r in on_calib.layers if r.range_overflow is not None]
    assert len(static) == len(on_calib.layers)  # every static layer is measured
    # A block's first layer sees on validation exactly what min-max observed (the quantized previous
    # blocks' outputs); later layers read outputs of quantized layers, which the float pass of the
    # block did not see: a few values beyond the range, as at run time.
    firsts = [r for r in static if r.role in ("attn_in", "proj_in")]
    assert firsts and all(r.range_overflow == 0 and r.range_overflow_max <= 1.0 + 1e-4 for r in firsts)
    assert all(r.range_overflow < 1e-2 and r.range_overflow_max < 1.1 for r in static)
    shifted = [{**s, "pixel_values": 6 * s["pixel_values"]} for s in _samples(case, range(10, 13))]
    held_out = quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8"), calib, validation=shifted)
    vision = [r for r in held_out.layers if r.part == "vision"]
    assert max(r.range_overflow for r in vision) > 0 and max(r.range_overflow_max for r in vision) > 1
    assert "range overflow" in held_out.to_markdown()


def test_dynamic_layers_and_no_validation_report_no_overflow(case):
    calib = _samples(case, range(2))
    report = quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8", "dynamic"), calib, validation=calib)
    assert all(r.range_overflow is None for r in report.layers)
    report = quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8"), calib)
    assert all(r.range_overflow is None for r in report.layers)


def test_auto_observer_picks_per_layer_the_lowest_validation_error(case):
    calib, val = _samples(case, range(3)), _samples(case, range(20, 22))
    model = copy.deepcopy(case.model)
    report = quantize(model, recipe_for("gptq", "w4a8", observer="auto"), calib, validation=val)
    chosen = {r.observer for r in report.layers}
    assert chosen <= {"minmax", "percentile", "mse"}
    scales = {m.name: [float(v) for v in m.act_scale] for m in quant_linears(model).values()}
    assert all(scales[r.name] == r.act_scale for r in report.layers)  # the report shows the scales in use
    with pytest.raises(ConfigError, match="validation split"):
        quantize(copy.deepcopy(case.model), recipe_for("gptq", "w4a8", observer="auto"), calib)


def test_auto_takes_the_candidate_with_the_lowest_validation_error_of_each_layer(case):
    calib = _samples(case, range(2))
    val = [{**s, "pixel_values": 3 * s["pixel_values"]} for s in _samples(case, range(30, 33))]
    report = quantize(copy.deepcopy(case.model), recipe_for("rtn", "w8a8", observer="auto"), calib, validation=val)
    for record in report.layers:
        errs = record.observer_errors
        assert set(errs) == {"minmax", "percentile", "mse"} and record.observer == min(errs, key=errs.get)
    assert any(len(set(r.observer_errors.values())) > 1 for r in report.layers)  # the candidates really differ
    assert len({r.observer for r in report.layers}) > 1  # and the choice is made per layer
