"""Tiny GLM-4V (GLM-4.1V layout): RMSNorm vision tower with a post-conv norm, learned position table
(image_size 16 / patch 4: a 4x4 table, bicubically resampled), 2x2 downsample conv, SwiGLU merger;
GLM-4 decoder with sandwich norms and partial (half) interleaved M-RoPE."""

from __future__ import annotations

import torch
from transformers import Glm4vConfig, Glm4vForConditionalGeneration

from mquant.testing.tiny import TinyCase, register_tiny
from mquant.testing.tiny.qwen2_vl import BOS_ID, EOS_ID, PAD_ID, TEXT_HIDDEN, VOCAB, MropeLayout, build_mrope_batch, finish_tiny

IMAGE_ID, VIDEO_ID, IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END = 250, 251, 246, 247, 248, 249
GLM_LAYOUT = MropeLayout(IMAGE_ID, IMAGE_START, IMAGE_END, patch_dim=3 * 2 * 4 * 4, merge=2)


@register_tiny("glm4v")
def tiny_glm4v(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    vision = {
        "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": TEXT_HIDDEN,
        "image_size": 16, "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
        "attention_bias": True,
    }  # fmt: skip
    # head_dim 16, partial_rotary_factor 0.5: 8 rotary dims = 4 frequencies split [1, 1, 2] over t/h/w.
    text = {
        "vocab_size": VOCAB, "hidden_size": TEXT_HIDDEN, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                            "partial_rotary_factor": 0.5},
    }  # fmt: skip
    config = Glm4vConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        image_start_token_id=IMAGE_START, image_end_token_id=IMAGE_END,
        video_start_token_id=VIDEO_START, video_end_token_id=VIDEO_END,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = finish_tiny(Glm4vForConditionalGeneration(config), seed, dtype)

    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        return build_mrope_batch(model, GLM_LAYOUT, batch_size, seed, text_only_row, padding)

    return TinyCase(family="glm4v", model=model, make_batch=make_batch)
