"""quantize → save_quantized → load_quantized is bit-exact for every scheme and every family."""

import copy
import json
import pickle

import pytest
import torch
from safetensors import safe_open

from mquant.api import load_quantized, quantize, save_quantized
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.testing.tiny import TEXT_FAMILIES, TINY_FAMILIES, tiny_case

# (language scheme, activations, group size, vision scheme): the vision tower and the language
# model take different schemes so three runs per family cover all five schemes.
SCHEMES = {
    "lang-w4a8-static+vis-w8a8-static": ("w4a8", "static", None, "w8a8"),
    "lang-w4a8-dynamic+vis-w8a16": ("w4a8", "dynamic", None, "w8a16"),
    "w4a16-g16": ("w4a16", "static", 16, None),
}


def _case_or_skip(family):
    try:
        return tiny_case(family)
    except ModuleNotFoundError as exc:  # another helper has not written this family yet
        pytest.skip(f"{family}: {exc}")


@pytest.fixture(scope="module", params=TINY_FAMILIES + TEXT_FAMILIES)
def family(request):
    case = _case_or_skip(request.param)
    return case, [case.batch(batch_size=1, seed=0)], case.batch(batch_size=2, seed=100, text_only_row=True)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_round_trip_is_bit_identical(family, scheme, tmp_path):
    case, samples, batch = family
    name, act, group, vision = SCHEMES[scheme]
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", name, act, vision_scheme=vision, group_size=group), samples)
    expected = _logits(model, batch)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded, batch), expected)
    saved, again = quant_linears(model), quant_linears(loaded)
    assert saved.keys() == again.keys()
    for key, layer in saved.items():
        assert torch.equal(layer.qweight, again[key].qweight) and torch.equal(layer.w_scale, again[key].w_scale)


@pytest.fixture(scope="module")
def w4_dir(tmp_path_factory):
    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w4a8", vision_scheme="w8a8"), [case.batch(batch_size=1, seed=0)])
    out = tmp_path_factory.mktemp("w4") / "q"
    save_quantized(model, out)
    return model, out


def test_int4_codes_are_stored_two_per_byte(w4_dir):
    model, out = w4_dir
    layers = quant_linears(model)
    meta = json.loads((out / "mquant_config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name, layer in layers.items():
            stored = f.get_slice(f"{name}.qweight")
            if layer.weight_bits == 4:
                assert stored.get_dtype() == "U8" and stored.get_shape() == [layer.out_features, layer.in_features // 2]
            else:
                assert stored.get_dtype() == "I8" and stored.get_shape() == [layer.out_features, layer.in_features]
            assert meta["layers"][name]["weight_bits"] == layer.weight_bits
    assert {layer.weight_bits for layer in layers.values()} == {4, 8}


def test_loading_never_unpickles(w4_dir, monkeypatch):
    _, out = w4_dir

    def refuse(*_args, **_kwargs):
        raise AssertionError("load_quantized must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert quant_linears(load_quantized(out))


def test_bfloat16_model_round_trips_in_bfloat16(tmp_path):
    case = tiny_case("qwen2_vl", dtype=torch.bfloat16)
    model = case.model
    quantize(model, recipe_for("rtn", "w8a8"), [case.batch(batch_size=1, seed=0)])
    batch = case.batch(batch_size=1, seed=7)
    expected = _logits(model, batch)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    out = _logits(loaded, batch)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_export_model_mquant_format_rewrites_an_equal_directory(w4_dir, tmp_path):
    from mquant.errors import ConfigError
    from mquant.io.export import export_model

    model, out = w4_dir
    again = export_model(out, "mquant", tmp_path / "again")
    batch = tiny_case("qwen2_vl").batch(batch_size=1, seed=4)
    assert torch.equal(_logits(load_quantized(again), batch), _logits(model, batch))
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(out, "gguf", tmp_path / "x")


def test_modality_specific_scales_round_trip(tmp_path):
    case = tiny_case("qwen2_vl")
    model = case.model
    quantize(model, recipe_for("rtn", "w8a8").with_steps("msq"), [case.batch(batch_size=1, seed=0)])
    assert any(not torch.equal(m.act_scale[0], m.act_scale[1]) for m in quant_linears(model).values())
    batch = case.batch(batch_size=2, seed=8, text_only_row=True)
    expected = _logits(model, batch)
    save_quantized(model, tmp_path / "q")
    assert torch.equal(_logits(load_quantized(tmp_path / "q"), batch), expected)
