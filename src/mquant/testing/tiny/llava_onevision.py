"""Tiny LLaVA-OneVision: SigLIP (32x32, patch 8 -> 4x4 patches, no pooling head) + Qwen2 (tied).

Images stay at the base resolution so the anyres bookkeeping is simple: `image_grid_pinpoints` is
just [[32, 32]], every image is (32, 32), so the processor makes 2 crops per image (the base view and
a 1x1 grid crop) and `pack_image_features` yields base h*w tokens + grid h*(w+1) tokens (one
`image_newline` after each grid row, no unpadding, no downscaling): 16 + 20 = 36 per image, the
count LlavaOnevisionProcessor._get_number_of_features gives for a 32x32 image.
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from mquant.testing.tiny import TinyCase, register_tiny
from mquant.testing.tiny.llava import PAD_ID, VOCAB, image_text_batch, model_dtype, perturb_affines, set_attention

IMAGE_ID, VIDEO_ID = 255, 254
IMAGE_SIZE, PATCH = 32, 8


def image_tokens() -> int:
    side = IMAGE_SIZE // PATCH
    return side * side + side * (side + 1)


def tiny_config() -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=PAD_ID, tie_word_embeddings=True)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]], vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True,
    )
    set_attention(config)
    return config


@register_tiny("llava_onevision")
def tiny_llava_onevision(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(tiny_config()).eval()
    perturb_affines(model, seed)
    model = model.to(dtype)

    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        ids, mask, has_image = image_text_batch(batch_size, seed, text_only_row, padding, [IMAGE_ID] * image_tokens())
        batch = {"input_ids": ids, "attention_mask": mask}
        n_images = sum(has_image)
        if n_images:
            gen = torch.Generator().manual_seed(seed + 7)
            # (images, crops, C, H, W): crop 0 is the base view, crop 1 the single grid crop.
            pixels = torch.randn((n_images, 2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen)
            batch["pixel_values"] = pixels.to(model_dtype(model))
            batch["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * n_images)
        return batch

    return TinyCase("llava_onevision", model, make_batch)
