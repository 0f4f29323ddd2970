"""Text-only causal LMs (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM): the language half of
the pipeline. Spec without vision; quantization with RTN, GPTQ and MQuant (MSQ/AIFS skipped, with a
note) on text samples; bit-identical save/load; the CLI on a saved directory; a vLLM-layout export."""

import copy
import dataclasses
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from mquant.api import quantize, save_quantized
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.errors import UnsupportedModelError
from mquant.io.loader import load_quantized
from mquant.io.processors import load_saved_processor
from mquant.models.causal_lm import LlamaAdapter, Qwen2Adapter, Qwen3Adapter
from mquant.models.registry import get_adapter
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.processors import tiny_tokenizer

METHODS = ("rtn", "gptq", "mquant")
SCHEMES = ("w8a8", "w4a8")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family,adapter", [("llama", LlamaAdapter), ("qwen2", Qwen2Adapter), ("qwen3", Qwen3Adapter)])
def test_spec_is_the_language_half(family, adapter):
    model = tiny_case(family).model
    assert isinstance(get_adapter(model), adapter)
    spec = get_adapter(model).validate(model)
    assert spec.text_only and spec.vision is None and spec.projector is None and spec.image_token_ids == ()
    assert spec.towers() == (spec.language,) and {part for part, _ in spec.all_linears()} == {"language"}
    assert spec.language.module is model.model and spec.language.final_norm.feeds[0].module is model.lm_head
    assert spec.language.tied_embeddings == (family == "llama")
    assert all((b.attention.q_norm is not None) == (family == "qwen3") for b in spec.language.blocks)


def test_a_half_vision_spec_is_refused():
    model = tiny_case("llama").model
    spec = get_adapter(model).validate(model)
    vlm = get_adapter(tiny_case("llava").model).validate(tiny_case("llava").model)
    from mquant.models.validation import validate_spec

    for broken in (dataclasses.replace(spec, projector=vlm.projector), dataclasses.replace(spec, image_token_ids=(5,)),
                   dataclasses.replace(vlm, projector=None)):
        with pytest.raises(UnsupportedModelError):
            validate_spec(broken)


@pytest.fixture(scope="module", params=("llama", "qwen2"))
def text_case(request):
    case = tiny_case(request.param)
    return case, [case.batch(batch_size=2, seed=s) for s in range(3)], case.batch(batch_size=3, seed=50, padding=True)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_quantize_and_round_trip(text_case, method, scheme, tmp_path):
    case, samples, batch = text_case
    model = copy.deepcopy(case.model)
    report = quantize(model, recipe_for(method, scheme), samples)
    layers = quant_linears(model)
    assert len(layers) == 7 * 2 and all(m.quantized and m.weight_bits == int(scheme[1]) for m in layers.values())
    assert {r.part for r in report.layers} == {"language"}
    if method == "mquant":
        assert set(report.transforms["skipped_steps"]) == {"msq", "aifs"}
        assert [s["name"] for s in report.recipe["steps"]] == ["ln_to_rms", "rotate", "online_hadamard", "rms"]
        assert report.transforms["rotate"]["language"]["rotated"] and report.transforms["online_hadamard"]["layers"]
        assert any(r.rms_split for r in report.layers) and all(r.online_hadamard for r in report.layers if r.role == "mlp_out")
        assert all(len(m.act_scale) == 2 and bool(m.act_scale[0] == m.act_scale[1]) for m in layers.values())
    expected = _logits(model, batch)
    reference = _logits(case.model, batch)
    assert torch.isfinite(expected).all() and float((expected - reference).norm() / reference.norm()) < (0.2 if scheme == "w8a8" else 0.6)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded, batch), expected)
    again = quant_linears(loaded)
    assert all(torch.equal(layer.qweight, again[k].qweight) and torch.equal(layer.act_scale, again[k].act_scale) for k, layer in layers.items())


def _saved_llama(directory):
    case = tiny_case("llama")
    case.model.save_pretrained(directory)
    tiny_tokenizer({}).save_pretrained(directory)
    return directory


def test_cli_quantizes_and_exports_a_saved_causal_lm(tmp_path, monkeypatch):
    from mquant.cli import main

    source = _saved_llama(tmp_path / "llama")
    for argv in (["quantize", str(source), "--method", "mquant", "--scheme", "w4a8", "--n-calib", "4", "--out", str(tmp_path / "mq")],
                 ["quantize", str(source), "--method", "rtn", "--scheme", "w8a8", "--n-calib", "4", "--out", str(tmp_path / "rtn")],
                 ["export", str(tmp_path / "rtn"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]):
        monkeypatch.setattr(sys, "argv", ["mquant", *argv])
        main()
    model = load_quantized(tmp_path / "mq")
    assert type(model).__name__ == "LlamaForCausalLM" and all(m.quantized for m in quant_linears(model).values())
    assert "- skipped step msq: no visual tokens" in (tmp_path / "mq" / "report.md").read_text()
    meta = json.loads((tmp_path / "mq" / "mquant_config.json").read_text())
    assert meta["calibration"] == {"source": "default", "n_samples": 4, "seed": 0, "prompts": "train", "text_fraction": 0.0,
                                   "decode_tokens": 0, "n_validation": 0}
    tokenizer = load_saved_processor(tmp_path / "mq")
    assert tokenizer("t7 t9")["input_ids"] == [7, 9]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight_scale" in tensors and "model.embed_tokens.weight" in tensors
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embedding
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
