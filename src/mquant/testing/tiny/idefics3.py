"""Tiny Idefics3 (untied LLaMA text) and SmolVLM (tied, like SmolVLM-256M's SmolLM2) models.

Vision: 48x48 images, patch 8 -> 6x6 patches; pixel shuffle 2 -> 9 image tokens per image, laid out
as the processor does for an unsplit image: `<fake_token_around_image><global-img>` + 9 x `<image>`
+ `<fake_token_around_image>`. pixel_values are (batch, images=1, 3, H, W); a text-only row holds an
all-zero padding image, which the model drops (that is how the processor pads image counts).
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

from mquant.testing.tiny import TinyCase, register_tiny
from mquant.testing.tiny.llava import image_text_batch, model_dtype, perturb_affines, set_attention, tiny_llama

IMAGE_ID, FAKE_ID, GLOBAL_ID = 255, 254, 253
IMAGE_SIZE, PATCH, SCALE = 48, 8, 2


def image_tokens() -> int:
    return (IMAGE_SIZE // PATCH) ** 2 // SCALE**2


def _vision_kwargs() -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=PATCH)


def _case(family: str, model: torch.nn.Module, seed: int, dtype: torch.dtype) -> TinyCase:
    perturb_affines(model, seed)
    model = model.to(dtype)
    block = [FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * image_tokens() + [FAKE_ID]

    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        ids, mask, has_image = image_text_batch(batch_size, seed, text_only_row, padding, block)
        batch = {"input_ids": ids, "attention_mask": mask}
        if any(has_image):
            gen = torch.Generator().manual_seed(seed + 7)
            pixels = torch.randn((batch_size, 1, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen)
            real = torch.tensor(has_image)
            pixels[~real] = 0.0  # padding image: all zeros, removed by get_image_features
            batch["pixel_values"] = pixels.to(model_dtype(model))
            pix_mask = torch.zeros((batch_size, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.bool)
            pix_mask[real] = True
            batch["pixel_attention_mask"] = pix_mask
        return batch

    return TinyCase(family, model, make_batch)


@register_tiny("idefics3")
def tiny_idefics3(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    config = Idefics3Config(vision_config=Idefics3VisionConfig(**_vision_kwargs()), text_config=tiny_llama(tie=False),
                            image_token_id=IMAGE_ID, scale_factor=SCALE, tie_word_embeddings=False)
    set_attention(config)
    torch.manual_seed(seed)
    return _case("idefics3", Idefics3ForConditionalGeneration(config).eval(), seed, dtype)


@register_tiny("smolvlm")
def tiny_smolvlm(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**_vision_kwargs()), text_config=tiny_llama(tie=True),
                           image_token_id=IMAGE_ID, scale_factor=SCALE, tie_word_embeddings=True)
    set_attention(config)
    torch.manual_seed(seed)
    return _case("smolvlm", SmolVLMForConditionalGeneration(config).eval(), seed, dtype)
