"""The engine-free half of the vLLM plugin: what it reads from a saved directory, how it names and
fuses our layers for vLLM, and that the layer it rebuilds from loaded tensors computes exactly what
our own QuantLinear (with its integer kernel) computes — MSQ row scales, online Hadamard and RMS
split included."""

import copy
import json

import pytest
import torch

from mquant.api import quantize, save_quantized
from mquant.config import recipe_for
from mquant.core.modality import ModalityContext
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.kernels.attach import attach_kernels
from mquant.quantizers.quantizer import pack_int4
from mquant.serving.served import ServedModel, build_linear
from mquant.testing.tiny import tiny_case

# vLLM's packed_modules_mapping for Llama-style decoders and CLIP (LlavaForConditionalGeneration)
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
MQUANT_LAYERWISE = recipe_for("mquant", "w4a8").with_steps("msq", "online_hadamard", "rms")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    case = tiny_case("llava")
    model = copy.deepcopy(case.model)
    quantize(model, MQUANT_LAYERWISE, [case.batch(batch_size=1, seed=0)])
    out = save_quantized(model, tmp_path_factory.mktemp("served") / "q")
    return out, model, case


def test_config_json_names_the_plugin(llava_dir):
    out, model, _ = llava_dir
    config = json.loads((out / "config.json").read_text())
    entry = config["quantization_config"]
    assert entry["quant_method"] == "mquant" and entry["config_file"] == "mquant_config.json"
    assert config["architectures"] == [type(model).__name__]
    assert entry["image_token_ids"] == [model.config.image_token_id]


def test_layers_get_hub_names_and_fused_shards(llava_dir):
    out, model, _ = llava_dir
    served = ServedModel.from_dir(out)
    served.check_servable()
    index = served.index()
    tower = [n for n in index if n.startswith("vision_tower.")]
    if type(model.model.vision_tower).__name__ in ("CLIPVisionModel", "SiglipVisionModel"):
        assert tower and all(n.startswith("vision_tower.vision_model.") for n in tower)
    qkv = served.shards("language_model.model.layers.0.self_attn.qkv_proj", PACKED)
    assert [n.rsplit(".", 1)[1] for n in qkv] == ["q_proj", "k_proj", "v_proj"]
    assert served.shards("language_model.model.layers.0.mlp.down_proj", PACKED) == ["model.language_model.layers.0.mlp.down_proj"]
    assert served.shards("language_model.lm_head", PACKED) == []
    assert served.shared_settings(qkv)["act_bits"] == 8


def test_fused_shards_that_differ_are_refused(llava_dir):
    out, _, _ = llava_dir
    served = ServedModel.from_dir(out)
    q, k, _ = served.shards("language_model.model.layers.0.self_attn.qkv_proj", PACKED)
    served.layers[k] = {**served.layers[k], "weight_bits": 8}
    with pytest.raises(ConfigError, match="differ in weight_bits"):
        served.shared_settings([q, k])


def test_structural_transforms_are_refused_in_one_line(tmp_path):
    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("mquant", "w4a8"), [case.batch(batch_size=1, seed=0)])
    served = ServedModel.from_dir(save_quantized(model, tmp_path / "q"))
    with pytest.raises(ConfigError, match="structural transforms") as info:
        served.check_servable()
    assert "\n" not in str(info.value)


def test_directories_without_the_entry_fall_back_to_config_ids(llava_dir, tmp_path):
    out, model, _ = llava_dir
    old = tmp_path / "old"
    old.mkdir()
    for path in out.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config))
    served = ServedModel.from_dir(old, model.config)
    assert served.layout is None and served.image_token_ids == (model.config.image_token_id,)


def _rebuilt(layer, ctx):
    codes = pack_int4(layer.qweight) if layer.weight_bits == 4 else layer.qweight
    tensors = {"qweight": codes, "w_scale": layer.w_scale, "act_scale": layer.act_scale, "rms_w0": layer.rms_w0}
    settings = {**layer.quant_settings(), "part": layer.modality}
    rebuilt = build_linear(settings, tensors, layer.out_features, ctx)
    rebuilt.bias = layer.bias
    return rebuilt


def test_rebuilt_layers_equal_ours_on_the_kernels(llava_dir):
    """Every layer, with visual and text rows mixed: bit-identical to our QuantLinear on its kernel."""
    _, model, _ = llava_dir
    model = copy.deepcopy(model)
    attach_kernels(model)
    layers = quant_linears(model)
    assert any(m.rms_split and m.online_hadamard for m in layers.values())
    assert any(bool(m.act_scale[0] != m.act_scale[1]) for m in layers.values() if m.act_scale is not None)
    gen = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        ctx = ModalityContext()
        x = torch.randn(6, layer.in_features, generator=gen)
        ctx.visual_mask = torch.tensor([False, True, True, True, False, False])
        saved_ctx, layer.modality_ctx = layer.modality_ctx, (ctx if layer.modality == "language" else None)
        expected = layer(x)
        layer.modality_ctx = saved_ctx
        got = _rebuilt(layer, ctx)(x)
        assert torch.equal(got, expected), name
