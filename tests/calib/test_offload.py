"""Offloaded quantization: weights stay on disk until their block is calibrated.

The budget test runs the quantization in child processes (`mquant.testing.capped`) whose private
memory is capped by the kernel (RLIMIT_DATA) at 80% of the float model's size above the child's own
baseline, and checks that (a) quantizing the fully loaded model under the same cap fails, so the cap
really bites, and (b) the offloaded run succeeds and gives exactly the quantized model and logits
of an unconstrained in-memory run. The full MQuant recipe streamed: tests/calib/test_streaming.py.
"""

import copy

import pytest
import torch

from mquant.api import load_quantized, quantize, quantize_offloaded, save_quantized
from mquant.calib.offload import load_offloaded, materialize
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.testing import capped
from mquant.testing.tiny import tiny_case

RECIPE = recipe_for("smoothquant", "w8a8")  # SmoothQuant edits norms in place: they must persist


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A Qwen2-VL with a 6-layer, 512-wide language model: ~74 MB of float32 weights on disk."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mquant.testing.tiny.qwen2_vl import _IDS, finish_tiny, text_config

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 512, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}
    text = text_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_IDS)
    config._attn_implementation = "eager"
    model = finish_tiny(Qwen2VLForConditionalGeneration(config), 0, torch.float32)
    path = tmp_path_factory.mktemp("big") / "float"
    model.save_pretrained(path)
    return model, path, sum(p.numel() * p.element_size() for p in model.parameters())


def test_offloaded_quantization_fits_a_budget_below_the_model_size(big_model, tmp_path):
    model, path, model_bytes = big_model
    budget = int(0.8 * model_bytes)
    procs = {mode: capped.start(mode, path, tmp_path / mode, budget, "smoothquant", "w8a8") for mode in ("in-memory", "offloaded")}
    # Meanwhile, the reference: the fully loaded model quantized without any limit.
    samples, batch = capped.samples_and_batch(model, model.config)
    reference = copy.deepcopy(model)
    quantize(reference, RECIPE, samples)
    in_memory, offloaded = (capped.read_result(procs[m], tmp_path / m) for m in ("in-memory", "offloaded"))
    capped.assert_only_streaming_fits(in_memory, offloaded, reference, batch)
    assert offloaded["loaded_bytes"] < model_bytes  # embeddings and lm_head were only streamed


def test_offloaded_equals_in_memory_and_saves(tmp_path):
    case = tiny_case("qwen2_vl")
    case.model.save_pretrained(tmp_path / "float")
    samples = [case.batch(batch_size=1, seed=i) for i in range(2)]
    reference = copy.deepcopy(case.model)
    quantize(reference, RECIPE, samples)
    model = load_offloaded(tmp_path / "float", offload_folder=tmp_path / "off", attn_implementation="eager")
    assert next(model.model.language_model.layers[0].parameters()).device.type == "meta"
    quantize_offloaded(model, RECIPE, samples)
    layers = quant_linears(model)
    assert all(torch.equal(layers[n].qweight, m.qweight) and torch.equal(layers[n].act_scale, m.act_scale)
               for n, m in quant_linears(reference).items())
    batch = case.batch(batch_size=2, seed=9, text_only_row=True)
    with torch.no_grad():
        expected = reference(**batch).logits
        assert torch.equal(model(**batch).logits, expected)
    assert materialize(model) > 0  # embeddings, lm_head, final norm: loaded only now, to save
    save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(**batch).logits, expected)
