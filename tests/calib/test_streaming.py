"""The full MQuant recipe streamed from disk (LN→RMSNorm, rotation, online Hadamard, RMS, MSQ, AIFS,
GPTQ; one block loaded and edited at a time) gives exactly the model `quantize` gives in memory:
every tensor of the state dict, the recorded structure, the report's transform info and the logits
are equal (torch.equal), for every tiny family and for a tied Qwen2-VL-2B-shaped model in float32
and bfloat16. The capped run: the same recipe under an RLIMIT_DATA budget below the model's bytes
fails in memory and succeeds streamed, with the unconstrained in-memory result."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, Qwen2VLConfig

from mquant.api import load_quantized, quantize, quantize_offloaded, save_quantized
from mquant.calib.offload import OffloadSession, load_offloaded
from mquant.config import recipe_for
from mquant.core.state import QuantState
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.steps.fold import random_rotation, rotate_writer
from mquant.testing import capped
from mquant.testing.equivalence import EQUIVALENCE_FAMILIES, family_missing
from mquant.testing.shapes import QWEN2_VL_2B, mrope_layout, qwen2_vl_config, random_model, write_random_checkpoint
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.qwen2_vl import _IDS, build_mrope_batch, text_config

RECIPE = recipe_for("mquant", "w4a8")


def _open_both(path, dtype=torch.float32):
    """The same checkpoint fully in memory and offloaded to disk (same attention implementation)."""
    text_only = adapter_for_model_type(AutoConfig.from_pretrained(path).model_type).text_only
    auto = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    reference = auto.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    return reference, load_offloaded(path, offload_folder=path.parent / "offload", dtype=dtype, attn_implementation="eager")


class OneBlockAtATime(OffloadSession):
    """Records, for each block it loads, whether the next block of its tower is still on disk."""

    def before_block(self, block):
        spec = self.adapter.validate(self.model)
        blocks = [b.module for tower in spec.towers() for b in tower.blocks]
        if block.module in blocks and blocks.index(block.module) + 1 < len(blocks):
            later = blocks[blocks.index(block.module) + 1]
            self.next_on_disk = getattr(self, "next_on_disk", []) + [all(p.device.type == "meta" for p in later.parameters())]
        return super().before_block(block)


def _assert_same_quantized_model(reference, streamed, batch):
    a, b = reference.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"
    assert QuantState.of(reference).structure == QuantState.of(streamed).structure
    flags = {n: (m.online_hadamard, m.rms_split, m.weight_bits, m.act_bits) for n, m in quant_linears(reference).items()}
    assert flags == {n: (m.online_hadamard, m.rms_split, m.weight_bits, m.act_bits) for n, m in quant_linears(streamed).items()}
    with torch.no_grad():
        assert torch.equal(reference(**batch).logits, streamed(**batch).logits)


@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_streamed_mquant_equals_in_memory(family, tmp_path):
    if family_missing(family):
        pytest.skip(family_missing(family))
    case = tiny_case(family)
    case.model.save_pretrained(tmp_path / "float")
    reference, streamed = _open_both(tmp_path / "float")
    assert next(get_adapter(streamed).validate(streamed).language.blocks[0].module.parameters()).device.type == "meta"
    samples = [case.batch(batch_size=1, seed=i) for i in range(2)]
    in_memory = quantize(reference, RECIPE, samples)
    session = OneBlockAtATime(streamed)
    report = quantize(streamed, RECIPE, samples, offload=session)
    assert report.transforms == in_memory.transforms
    assert session.next_on_disk and all(session.next_on_disk)  # each block was edited before the next was read
    rotated = [p for p in ("vision", "language") if p in report.transforms["rotate"] and report.transforms["rotate"][p]["rotated"]]
    assert rotated and report.transforms["online_hadamard"]["layers"]  # the recipe really rewrote weights
    assert any(m.rms_split for m in quant_linears(streamed).values())
    _assert_same_quantized_model(reference, streamed, case.batch(batch_size=2, seed=9, text_only_row=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tied_2b_shape_streams_exactly_and_saves(dtype, tmp_path):
    config = qwen2_vl_config(QWEN2_VL_2B, 4, vision_depth=1, text_layers=1, vocab_size=2048)
    path = write_random_checkpoint(config, tmp_path / "float", seed=2, dtype=dtype, shard_bytes=2 << 20)
    reference, streamed = _open_both(path, dtype)
    assert streamed.lm_head.weight is streamed.model.language_model.embed_tokens.weight
    layout = mrope_layout(config)
    samples = [build_mrope_batch(reference, layout, 1, i, False, False) for i in range(2)]
    quantize(reference, RECIPE, samples)
    quantize_offloaded(streamed, RECIPE, samples)
    assert QuantState.of(streamed).structure["norms"]["untied"] and not streamed.config.tie_word_embeddings
    batch = build_mrope_batch(reference, layout, 2, 7, True, True)
    _assert_same_quantized_model(reference, streamed, batch)
    save_quantized(streamed, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(**batch).logits, reference(**batch).logits)


class Crash(Exception):
    pass


def test_streamed_run_resumes_from_its_checkpoint(tmp_path):
    case = tiny_case("qwen2_vl")
    case.model.save_pretrained(tmp_path / "float")
    samples = [case.batch(batch_size=1, seed=i) for i in range(2)]
    reference, streamed = _open_both(tmp_path / "float")
    quantize(reference, RECIPE, samples)

    def crash(label, _advance):
        if label == "language 1/2":
            raise Crash(label)

    with pytest.raises(Crash):
        quantize_offloaded(streamed, RECIPE, samples, progress=crash, checkpoint_dir=tmp_path / "ckpt")
    resumed = load_offloaded(tmp_path / "float", offload_folder=tmp_path / "offload2", attn_implementation="eager")
    quantize_offloaded(resumed, RECIPE, samples, checkpoint_dir=tmp_path / "ckpt")
    _assert_same_quantized_model(reference, resumed, case.batch(batch_size=2, seed=9, text_only_row=True))


def test_an_edit_of_a_tensor_still_on_disk_fails_loudly(tmp_path):
    """What cannot stream: a transform touching a module that is not loaded yet (a model-level edit
    reaching into a block) must not be dropped silently by the meta tensor."""
    tiny_case("qwen2_vl").model.save_pretrained(tmp_path / "float")
    model = load_offloaded(tmp_path / "float", offload_folder=tmp_path / "off")
    o_proj = model.model.language_model.layers[0].self_attn.o_proj
    with pytest.raises(ConfigError, match="still offloaded to disk"):
        rotate_writer(o_proj, random_rotation(o_proj.out_features, 0))


def _capped_config() -> Qwen2VLConfig:
    """A Qwen2-VL whose 8 language blocks (768 wide, MLP 768) are 96% of its 102 MB: a tiny vision
    tower and vocabulary, tied embeddings (rotation unties them)."""
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 768, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}
    text = text_config(hidden_size=768, intermediate_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_IDS)


def test_streamed_mquant_fits_a_budget_below_the_model_size(tmp_path):
    config = _capped_config()
    path = write_random_checkpoint(config, tmp_path / "float", dtype=torch.float32, shard_bytes=16 << 20)
    model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    budget = int(0.8 * model_bytes)
    procs = {mode: capped.start(mode, path, tmp_path / mode, budget, "mquant", "w4a8") for mode in ("in-memory", "offloaded")}
    # Meanwhile the reference: the same seeded model built in memory, quantized without any limit.
    config._attn_implementation = "eager"
    reference = random_model(config, dtype=torch.float32)
    samples, batch = capped.samples_and_batch(reference, config)
    quantize(reference, RECIPE, samples)
    in_memory, streamed = (capped.read_result(procs[m], tmp_path / m) for m in ("in-memory", "offloaded"))
    capped.assert_only_streaming_fits(in_memory, streamed, reference, batch)
