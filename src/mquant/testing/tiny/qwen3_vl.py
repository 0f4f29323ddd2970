"""Tiny Qwen3-VL: 3 vision blocks with DeepStack taps after blocks 0 and 1 (a tap reads an
intermediate stream, not the final one) and 3 decoder layers: the taps add after layers 0 and 1 and,
as in the released models, not after the last layer."""

from __future__ import annotations

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mquant.testing.tiny import TinyCase, register_tiny
from mquant.testing.tiny.qwen2_vl import (
    END_ID,
    IMAGE_ID,
    QWEN_LAYOUT,
    START_ID,
    TEXT_HIDDEN,
    VIDEO_ID,
    build_mrope_batch,
    finish_tiny,
    text_config,
)  # fmt: skip


@register_tiny("qwen3_vl")
def tiny_qwen3_vl(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    vision = {
        "depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": TEXT_HIDDEN,
        "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
        "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1],
    }  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = text_config(head_dim=16, rope_parameters=rope, attention_bias=False, num_hidden_layers=3)
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=START_ID, vision_end_token_id=END_ID,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = finish_tiny(Qwen3VLForConditionalGeneration(config), seed, dtype)

    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        return build_mrope_batch(model, QWEN_LAYOUT, batch_size, seed, text_only_row, padding)

    return TinyCase(family="qwen3_vl", model=model, make_batch=make_batch)
