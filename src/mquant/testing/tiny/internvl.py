"""Tiny InternVL (transformers-native): InternViT (32x32, patch 4 -> 8x8 patches + CLS, LayerScale,
use_mean_pooling=True as in released checkpoints) + pixel shuffle 0.5 + Qwen2 (tied).

Image tokens per image: (32/4)^2 * 0.5^2 = 16 `<IMG_CONTEXT>` between `<img>` and `</img>`, the
processor's layout for one 32x32 tile. pixel_values hold one tile per image row: (n_images, 3, H, W).
`tiny_internvl_config(norm_type="rms_norm", qk_norm=True)` gives the InternViT-6B flavour.
"""

from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

from mquant.testing.tiny import TinyCase, register_tiny
from mquant.testing.tiny.llava import PAD_ID, VOCAB, image_text_batch, model_dtype, perturb_affines, set_attention

IMAGE_ID, START_ID, END_ID = 255, 254, 253
IMAGE_SIZE, PATCH = 32, 4


def image_tokens() -> int:
    return (IMAGE_SIZE // PATCH) ** 2 // 4


def tiny_internvl_config(norm_type: str = "layer_norm", qk_norm: bool = False) -> InternVLConfig:
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH, norm_type=norm_type, use_qk_norm=qk_norm, use_mean_pooling=True, attention_bias=True,
    )
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=PAD_ID, tie_word_embeddings=True)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, downsample_ratio=0.5,
                            vision_feature_layer=-1, vision_feature_select_strategy="default",
                            image_seq_length=image_tokens(), tie_word_embeddings=True)
    set_attention(config)
    return config


def internvl_case(config: InternVLConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # released checkpoints have non-zero CLS/position embeddings (init is zeros)
        emb = model.model.vision_tower.embeddings
        for param in (emb.cls_token, emb.position_embeddings):
            param.normal_(0.0, 0.5)
    perturb_affines(model, seed)
    model = model.to(dtype)
    block = [START_ID] + [IMAGE_ID] * image_tokens() + [END_ID]

    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        ids, mask, has_image = image_text_batch(batch_size, seed, text_only_row, padding, block)
        batch = {"input_ids": ids, "attention_mask": mask}
        n_images = sum(has_image)
        if n_images:
            gen = torch.Generator().manual_seed(seed + 7)
            pixels = torch.randn((n_images, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen)
            batch["pixel_values"] = pixels.to(model_dtype(model))
        return batch

    return TinyCase("internvl", model, make_batch)


@register_tiny("internvl")
def tiny_internvl(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    return internvl_case(tiny_internvl_config(), seed, dtype)
