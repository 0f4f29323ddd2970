"""Qwen2-VL-2B/7B-shaped configs and random models: the published architecture, counted on the meta
device; the same seeded tensors in memory (bf16, no float32 copy) and in a sharded checkpoint."""

import json

import pytest
import torch

from mquant.calib.offload import load_offloaded
from mquant.testing.shapes import (
    QWEN2_VL_2B,
    QWEN2_VL_7B,
    meta_model,
    mrope_layout,
    parameter_count,
    qwen2_vl_config,
    random_model,
    write_random_checkpoint,
)
from mquant.testing.tiny.qwen2_vl import build_mrope_batch


@pytest.mark.parametrize("shape", [QWEN2_VL_2B, QWEN2_VL_7B], ids=["2b", "7b"])
def test_published_shape_and_size(shape):
    config = qwen2_vl_config(shape)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (shape.hidden_size, 28, shape.num_attention_heads,
                                                         shape.num_key_value_heads, shape.intermediate_size, shape.vocab_size)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio, vision.patch_size, vision.spatial_merge_size) == (32, 1280, 16, 4, 14, 2)
    assert vision.hidden_size == text.hidden_size  # the merger writes the language stream
    assert config.tie_word_embeddings is shape.tie_word_embeddings and config.image_token_id == 151655
    model = meta_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) is shape.tie_word_embeddings
    count = parameter_count(config)
    assert abs(count / shape.published_params - 1) < 0.005, count  # 2B: 2,208,985,600; 7B: 8,291,375,616


def test_scale_down_divides_widths_and_refuses_what_breaks_rotary():
    config = qwen2_vl_config(QWEN2_VL_7B, 4, vision_depth=1, text_layers=2)
    assert (config.text_config.hidden_size, config.text_config.intermediate_size, config.vision_config.embed_dim) == (896, 4736, 320)
    assert config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    assert config.image_token_id < config.text_config.vocab_size == 152064 // 4
    with pytest.raises(ValueError, match="multiple of 4"):
        qwen2_vl_config(QWEN2_VL_2B, 8)


@pytest.fixture(scope="module")
def tiny_2b():
    """The 2B architecture at a quarter width, 1 vision and 2 language blocks, a 4k vocabulary."""
    config = qwen2_vl_config(QWEN2_VL_2B, 4, vision_depth=1, text_layers=2, vocab_size=4096)
    config._attn_implementation = "eager"
    return config


def test_random_model_is_seeded_bf16_and_tied(tiny_2b):
    model = random_model(tiny_2b, seed=3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == parameter_count(tiny_2b)
    norm = model.model.language_model.norm.weight.float()
    assert 0.5 < float(norm.mean()) < 1.5 and float(norm.std()) > 0.05  # gains off their 1 init
    again, other = random_model(tiny_2b, seed=3), random_model(tiny_2b, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    batch = build_mrope_batch(model, mrope_layout(tiny_2b), 2, 0, True, True)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_checkpoint_written_by_shards_loads_as_the_same_model(tiny_2b, tmp_path):
    model = random_model(tiny_2b, seed=1, dtype=torch.float32)
    path = write_random_checkpoint(tiny_2b, tmp_path / "ckpt", seed=1, dtype=torch.float32, shard_bytes=4 << 20)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as the embedding
    for shard in shards:  # one shard in memory at a time: none is larger than the limit unless it holds one tensor
        held = [n for n, f in index["weight_map"].items() if f == shard]
        assert len(held) == 1 or (path / shard).stat().st_size <= (4 << 20) + 65536, (shard, held)
    offloaded = load_offloaded(path, offload_folder=tmp_path / "off", attn_implementation="eager")
    assert next(offloaded.model.language_model.layers[0].parameters()).device.type == "meta"
    batch = build_mrope_batch(model, mrope_layout(tiny_2b), 2, 5, True, False)
    with torch.no_grad():
        assert torch.equal(offloaded(**batch).logits, model(**batch).logits)


def test_checkpoint_is_written_under_a_quarter_of_its_size(tmp_path):
    """No whole model in memory: the writer runs in a child capped at 25% of the checkpoint's bytes
    and writes exactly the tensors `random_model` builds."""
    from safetensors.torch import load_file

    from mquant.testing import capped

    config = qwen2_vl_config(QWEN2_VL_2B, 4, vision_depth=2, text_layers=4, vocab_size=4096)
    config.save_pretrained(tmp_path / "config")
    model_bytes = parameter_count(config) * 4
    result = capped.read_result(capped.start("write", tmp_path / "config", tmp_path / "w", model_bytes // 4, "rtn", "w8a8"), tmp_path / "w")
    assert result["ok"], result
    written = {}
    for shard in (tmp_path / "w" / "written").glob("*.safetensors"):
        written.update(load_file(str(shard)))
    assert sum(t.numel() * t.element_size() for t in written.values()) == model_bytes
    expected = random_model(config, dtype=torch.float32).state_dict()
    assert all(torch.equal(written[name], expected[name]) for name in written)
