"""Processor: 64 image tokens before the question, left padding, ImageNet-normalised 112x112 pixels."""

import pytest
import torch
from PIL import Image

from mquant.demo.processor import IMAGE_SIZE, NUM_IMAGE_TOKENS, DefaultProcessor
from mquant.demo.smollm import load_smollm2_tokenizer
from mquant.errors import InputError


@pytest.fixture(scope="module")
def proc():
    return DefaultProcessor(load_smollm2_tokenizer())


def test_batch_shapes_and_left_padding(proc):
    imgs = [Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), (200, 0, 0))]
    batch = proc(imgs, ["what shape is in the image?", "is there a red shape?"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ids == proc.image_token_id).sum(1).tolist() == [NUM_IMAGE_TOKENS] * 2
    assert NUM_IMAGE_TOKENS >= 64
    short = int(mask[1].sum())
    assert short < ids.shape[1] and mask[1, : ids.shape[1] - short].sum() == 0 and mask[1, -1] == 1
    assert (mask[0] == 1).all()
    # the prompt ends with the assistant header, the image precedes the question
    text = proc.decode(ids[0])
    assert text.rstrip().endswith("assistant") and "what shape" in text
    first_q = (ids[0] == proc.tokenizer.convert_tokens_to_ids("<|im_end|>")).nonzero()[0].item()
    assert (ids[0] == proc.image_token_id).nonzero().max().item() < first_q
    # white after ImageNet normalisation is (1 - mean) / std, per channel
    assert torch.allclose(batch["pixel_values"][0, :, 0, 0], torch.tensor([2.2489, 2.4286, 2.64]), atol=1e-3)


def test_mismatched_inputs(proc):
    with pytest.raises(InputError):
        proc([Image.new("RGB", (8, 8))], ["a", "b"])
    with pytest.raises(InputError):
        proc(["not an image"], ["a"])


def test_standard_llava_processor_builds_identical_inputs(proc, tmp_path):
    """The saved LlavaProcessor (what transformers and serving engines load) gives DefaultProcessor's
    ids, mask and pixels bit for bit: batched with left padding, any image size, untrimmed questions."""
    from transformers import AutoProcessor

    from mquant.io.processors import save_processor

    save_processor(proc, tmp_path)
    standard = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(standard).__name__ == "LlavaProcessor"
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()) for h, w in ((112, 112), (57, 300))]
    questions = ["  what shape is in the image? ", "is there a red shape?"]
    ours = proc(images, questions)
    texts = [standard.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                          add_generation_prompt=True) for q in questions]
    theirs = standard(images=images, text=texts, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(ours[key], theirs[key]), key
