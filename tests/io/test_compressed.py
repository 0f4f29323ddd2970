"""compressed-tensors export: the config is the library's own, the tensors are named as vLLM loads
them, and the compressed-tensors library (through transformers' loader) decompresses exactly our
dequantized weights and scales. Unrepresentable features fail with ConfigError."""

import copy
import json
import sys

import pytest
import torch
from safetensors import safe_open

from mquant.api import quantize, save_quantized
from mquant.config import recipe_for
from mquant.core.qlinear import dequantize_weight
from mquant.core.state import QuantState
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.io.compressed import checkpoint_name, export_compressed_tensors
from mquant.testing.tiny import TINY_FAMILIES, tiny_case

LAYER = "model.language_model.layers.0.self_attn.q_proj"  # Qwen2-VL; saved as model.layers.0…


@pytest.fixture(scope="module")
def case():
    return tiny_case("qwen2_vl")


def _quantized(case, *args, **kwargs):
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", *args, **kwargs), [case.batch(batch_size=1, seed=0)])
    return model


def _reload_decompressed(model, out):
    """What a user does: transformers' from_pretrained (compressed-tensors quantizer) then the
    library's ModelCompressor.decompress_model."""
    loaded = type(model).from_pretrained(str(out))
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    return loaded


def _assert_same_weights(model, loaded):
    for name, layer in quant_linears(model).items():
        mine = loaded.get_submodule(name)
        assert torch.equal(mine.weight, dequantize_weight(layer.qweight, layer.w_scale, torch.float32)), name
        assert torch.equal(mine.weight_scale, layer.w_scale), name
        if layer.act_bits is not None and not layer.act_dynamic:
            assert torch.equal(mine.input_scale, layer.act_scale[:1]), name
        else:
            assert not hasattr(mine, "input_scale"), name


def _tensors(out):
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


def test_w8a8_static_exports_int_quantized_and_decompresses_exactly(case, tmp_path):
    model = _quantized(case, "w8a8")
    out = export_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    saved = checkpoint_name(model, LAYER)
    tensors = _tensors(out)
    assert tensors[f"{saved}.weight"] == ("I8", [64, 64]) and tensors[f"{saved}.weight_scale"] == ("F32", [64, 1])
    assert tensors[f"{saved}.input_scale"] == ("F32", [1]) and "lm_head.weight" in tensors
    loaded = _reload_decompressed(model, out)
    _assert_same_weights(model, loaded)
    batch = case.batch(batch_size=2, seed=9)
    with torch.no_grad():  # the library's fake-quant forward: same static int8 maths as ours
        ours, theirs = model(**batch).logits, loaded(**batch).logits
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_w4a16_group_exports_pack_quantized(case, tmp_path):
    model = _quantized(case, "w4a16", group_size=16)
    out = export_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "pack-quantized" and group["input_activations"] is None
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["group_size"]) == (4, "group", 16)
    saved = checkpoint_name(model, LAYER)
    tensors = _tensors(out)
    assert tensors[f"{saved}.weight_packed"] == ("I32", [64, 64 * 4 // 32])
    assert tensors[f"{saved}.weight_shape"][0] == "I64" and tensors[f"{saved}.weight_scale"] == ("F32", [64, 4])
    assert f"{saved}.weight" not in tensors
    _assert_same_weights(model, _reload_decompressed(model, out))


def test_w8a8_dynamic_and_w8a16(case, tmp_path):
    dynamic = _quantized(case, "w8a8", "dynamic")
    out = export_compressed_tensors(dynamic, tmp_path / "dyn")
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("token", True)
    assert not any(k.endswith("input_scale") for k in _tensors(out))
    _assert_same_weights(dynamic, _reload_decompressed(dynamic, out))
    w8a16 = _quantized(case, "w8a16")
    out = export_compressed_tensors(w8a16, tmp_path / "w8a16")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    _assert_same_weights(w8a16, _reload_decompressed(w8a16, out))


def test_mixed_schemes_target_layers_by_name(case, tmp_path):
    model = _quantized(case, "w4a16", vision_scheme="w8a8")
    out = export_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    targets = {g["weights"]["num_bits"]: g["targets"] for g in qc["config_groups"].values()}
    assert checkpoint_name(model, LAYER) in targets[4] and LAYER in targets[4]
    assert "model.visual.blocks.0.attn.qkv" in targets[8]
    _assert_same_weights(model, _reload_decompressed(model, out))


def test_export_from_a_saved_directory_via_cli(case, tmp_path, monkeypatch, capsys):
    from mquant.cli import main

    model = _quantized(case, "w8a8")
    save_quantized(model, tmp_path / "q")
    monkeypatch.setattr(sys, "argv", ["mquant", "export", str(tmp_path / "q"), "--format", "compressed-tensors",
                                      "--out", str(tmp_path / "ct")])
    main()
    _assert_same_weights(model, _reload_decompressed(model, tmp_path / "ct"))


def _with(model, edit):
    edit(model)
    return model


UNREPRESENTABLE = {
    "modality-specific": (lambda c: _msq(c), "modality-specific"),
    "w4a8-static": (lambda c: _quantized(c, "w4a8"), "W4A8 with static"),
    "online-hadamard": (lambda c: _with(_quantized(c, "w8a8"), lambda m: setattr(quant_linears(m)[LAYER], "online_hadamard", True)),
                        "online Hadamard"),
    "rms-split": (lambda c: _with(_quantized(c, "w8a8"), lambda m: setattr(quant_linears(m)[LAYER], "rms_split", True)), "RMS split"),
    "structure": (lambda c: _with(_quantized(c, "w8a8"), lambda m: QuantState.ensure(m).record_structure("ln_to_rms", {})),
                  "structural transforms"),
    "extra-rotation-buffer": (lambda c: _with(_quantized(c, "w8a8"), lambda m: m.model.register_buffer("rotation", torch.eye(4))),
                              "has no place"),
    "group-w8a8": (lambda c: _quantized(c, "w8a8", group_size=16), "per-group"),
}


def _msq(case):
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w8a8").with_steps("msq"), [case.batch(batch_size=1, seed=0)])
    return model


@pytest.mark.parametrize("kind", list(UNREPRESENTABLE))
def test_unrepresentable_features_raise_config_error(case, tmp_path, kind):
    build, words = UNREPRESENTABLE[kind]
    with pytest.raises(ConfigError) as info:
        export_compressed_tensors(build(case), tmp_path / "ct")
    message = str(info.value)
    assert words in message and "--format mquant" in message and "\n" not in message
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_exports_w8a8_exactly(family, tmp_path):
    other = tiny_case(family)
    model = _quantized(other, "w8a8")
    out = export_compressed_tensors(model, tmp_path / "ct")
    _assert_same_weights(model, _reload_decompressed(model, out))
