"""compressed-tensors exports use the hub / vLLM checkpoint layout of each family (the table in
io/checkpoint_layout.py), and lose nothing: renamed back, the export is the quantized model."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion

from mquant.api import quantize
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.io import checkpoint_layout as layout_mod
from mquant.io.checkpoint_layout import TOWER_LAYOUTS, checkpoint_layout
from mquant.io.compressed import export_compressed_tensors
from mquant.models import registry
from mquant.models.registry import get_adapter
from mquant.testing.tiny import TEXT_FAMILIES, TINY_FAMILIES, tiny_case

FAMILIES = (*TINY_FAMILIES, "llava_dinov2", *TEXT_FAMILIES)

# What hub checkpoints of each family hold (and vLLM 0.32 loads, through its hf_to_vllm_mapper),
# written out independently of the table: every exported tensor starts with one of these, and
# each of them is used.
_LLAVA_HUB = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.", "multi_modal_projector.")
_QWEN2_HUB = ("model.embed_tokens.", "model.layers.", "model.norm.", "visual.", "lm_head.")
_NEW_HUB = ("model.language_model.", "model.visual.", "lm_head.")
_CAUSAL_HUB = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
HUB_PREFIXES = {
    "llava": _LLAVA_HUB,
    "llava_dinov2": ("language_model.model.", "language_model.lm_head.", "vision_tower.embeddings.", "vision_tower.encoder.layer.",
                     "vision_tower.layernorm.", "multi_modal_projector."),
    "llava_onevision": (*_LLAVA_HUB, "image_newline"),
    "internvl": ("language_model.model.", "language_model.lm_head.", "vision_tower.embeddings.", "vision_tower.encoder.layer.",
                 "multi_modal_projector."),
    "qwen2_vl": _QWEN2_HUB,
    "qwen2_5_vl": _QWEN2_HUB,
    "qwen3_vl": _NEW_HUB,
    "glm4v": _NEW_HUB,
    "idefics3": ("model.text_model.", "model.vision_model.", "model.connector.", "lm_head."),
    "llama": _CAUSAL_HUB,
    "qwen2": _CAUSAL_HUB,
    "qwen3": _CAUSAL_HUB,
}


def _quantized(family, scheme="w8a8"):
    case = tiny_case(family)
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", scheme), [case.batch(batch_size=1, seed=0)])
    return model


def _expected_export(model):
    """What the export must hold, by module name: float tensors as they are, quantized linears as
    compressed-tensors stores them (int8 codes, scales, static input scale)."""
    layers = quant_linears(model)
    out = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    for name, layer in layers.items():
        out[f"{name}.weight"] = layer.qweight
        out[f"{name}.weight_scale"] = layer.w_scale
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias
        if layer.act_bits is not None and not layer.act_dynamic:
            out[f"{name}.input_scale"] = layer.act_scale[:1]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_export_uses_the_hub_layout_and_renamed_back_is_the_quantized_model(family, tmp_path):
    model = _quantized(family)
    out = export_compressed_tensors(model, tmp_path / "ct")
    tensors = load_file(str(out / "model.safetensors"))
    prefixes = HUB_PREFIXES[family]
    stray = [k for k in tensors if not k.startswith(prefixes)]
    assert not stray, f"{family}: not in the hub layout: {stray[:3]}"
    tied = get_adapter(model).validate(model).language.tied_embeddings  # a tied lm_head is stored once, as the embedding
    unused = [p for p in prefixes if not any(k.startswith(p) for k in tensors) and not (tied and "lm_head" in p)]
    assert not unused, f"{family}: hub prefixes {unused} hold no tensor"
    layout = checkpoint_layout(model)
    back = {layout.to_module(k): v for k, v in tensors.items()}
    expected = _expected_export(model)
    assert len(back) == len(tensors) and set(back) <= set(expected)
    for key, value in expected.items():
        if key not in back:  # only a tied duplicate may be left out, and its twin is stored
            twins = [k for k in back if expected[k].data_ptr() == value.data_ptr()]
            assert twins, f"{family}: {key} is missing from the export"
            continue
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), f"{family}: {key} differs"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    head = layout.to_checkpoint("lm_head")
    assert head in qc["ignore"] and "lm_head" in qc["ignore"]


def test_dinov2_blocks_use_the_hub_attention_names(tmp_path):
    tensors = load_file(str(export_compressed_tensors(_quantized("llava_dinov2"), tmp_path / "ct") / "model.safetensors"))
    assert "vision_tower.encoder.layer.0.attention.attention.query.weight" in tensors
    assert "vision_tower.encoder.layer.0.attention.output.dense.weight_scale" in tensors
    assert not any(".q_proj" in k and "vision_tower" in k for k in tensors)


def test_w4a16_packed_tensors_follow_the_layout(tmp_path):
    model = _quantized("llava", "w4a16")
    tensors = load_file(str(export_compressed_tensors(model, tmp_path / "ct") / "model.safetensors"))
    name = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    assert {f"{name}.weight_packed", f"{name}.weight_shape", f"{name}.weight_scale"} <= set(tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_table_agrees_with_transformers_own_hub_mapping(family):
    """transformers, reverting the full conversion mapping it applies when loading a hub checkpoint
    (PrefixChange levels included), writes the same names as our table."""
    model = tiny_case(family).model
    layout = checkpoint_layout(model)
    state = model.state_dict()
    model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    theirs = revert_weight_conversion(model, dict(state))
    owner = {id(v): k for k, v in state.items()}
    pairs = {owner[id(v)]: k for k, v in theirs.items()}
    assert len(pairs) == len(state)
    wrong = {k: (layout.to_checkpoint(k), v) for k, v in pairs.items() if layout.to_checkpoint(k) != v}
    assert not wrong, f"{family}: ours vs transformers: {list(wrong.items())[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_name_round_trips(family):
    model = tiny_case(family).model
    layout = checkpoint_layout(model)
    # Names that hold tensors (what tensors, `ignore` and `targets` name); pure containers such as
    # Qwen2-VL's `model` have no checkpoint counterpart.
    names = [n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))] + list(model.state_dict())
    assert all(layout.to_module(layout.to_checkpoint(n)) == n for n in names)
    assert len({layout.to_checkpoint(n) for n in names}) == len(set(names))


def test_tower_levels_are_the_ones_transformers_flattened():
    """Each level we re-insert is a PrefixChange transformers removes when loading that class."""
    for cls, tower in TOWER_LAYOUTS.items():
        removed = {t.prefix_to_remove for t in get_checkpoint_conversion_mapping(cls) or [] if isinstance(t, PrefixChange)}
        assert removed == ({tower.level} if tower.level else set()), cls


def test_every_family_has_a_layout():
    registry.supported_model_types()  # loads the built-in adapters
    families = {get_adapter(tiny_case(f).model).family for f in FAMILIES} | {a.family for a in registry._ADAPTERS}
    assert families <= set(layout_mod.FAMILY_PREFIXES)


def test_unknown_family_and_swiglu_dinov2_are_refused(monkeypatch):
    model = tiny_case("llava").model
    monkeypatch.delitem(layout_mod.FAMILY_PREFIXES, "llava")
    with pytest.raises(ConfigError, match="--format mquant"):
        checkpoint_layout(model)
    monkeypatch.undo()
    dino = tiny_case("llava_dinov2").model
    monkeypatch.setattr(dino.model.vision_tower.config, "use_swiglu_ffn", True)
    with pytest.raises(ConfigError, match="SwiGLU DINOv2.*--format mquant"):
        checkpoint_layout(dino)
