"""Tiny Qwen2-VL and Qwen2.5-VL models, plus the M-RoPE batch builder shared with Qwen3-VL and GLM-4V.

All four families take the same inputs: `pixel_values` as a flat list of patches
[num_patches, channels * temporal_patch * patch * patch], `image_grid_thw` (t, h, w in patches) per
image, and `mm_token_type_ids` (0 text, 1 image, 2 video) from which `get_rope_index` builds the 3-D
position ids. The processor puts t*h*w / merge**2 placeholder tokens per image, between a start
and an end token; `build_mrope_batch` does the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mquant.testing.tiny import TinyCase, register_tiny

VOCAB = 256
PAD_ID = 0
TEXT_IDS = (1, 240)  # random text tokens are drawn from [1, 240): below every special id
IMAGE_ID, VIDEO_ID, START_ID, END_ID = 250, 251, 248, 249
BOS_ID, EOS_ID = 252, 253
TEXT_HIDDEN = 64


@dataclass(frozen=True)
class MropeLayout:
    """What the processor needs to lay out one image: ids and the patch geometry."""

    image_token_id: int
    start_token_id: int
    end_token_id: int
    patch_dim: int  # channels * temporal_patch * patch * patch
    merge: int  # spatial merge size: merge**2 patches become one token


def _row_grid(row: int, padding: bool) -> tuple[int, int, int]:
    # With padding, odd rows carry a smaller image so the rows differ in length.
    return (1, 4, 8) if padding and row % 2 else (1, 8, 8)


def build_mrope_batch(
    model: nn.Module, layout: MropeLayout, batch_size: int, seed: int, text_only_row: bool, padding: bool
) -> dict:
    """Inputs for `model(**batch)`: left-padded when `padding`, last row text-only when asked."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    rows, types, pixels, grids = [], [], [], []
    for row in range(batch_size):
        grid = _row_grid(row, padding)
        n_tokens = grid[0] * grid[1] * grid[2] // layout.merge**2
        prefix = _text(gen, 3 + (row if padding else 0))
        suffix = _text(gen, 4 + (row % 2 if padding else 0))
        if text_only_row and row == batch_size - 1:
            # Same length as an image row when unpadded, so no padding is needed.
            middle = _text(gen, n_tokens + 2 if not padding else 2)
            kinds = [0] * middle.numel()
        else:
            middle = torch.tensor([layout.start_token_id] + [layout.image_token_id] * n_tokens + [layout.end_token_id])
            kinds = [0] + [1] * n_tokens + [0]
            n_patches = grid[0] * grid[1] * grid[2]
            pixels.append(torch.randn(n_patches, layout.patch_dim, generator=gen, dtype=torch.float64))
            grids.append(grid)
        rows.append(torch.cat([prefix, middle, suffix]))
        types.append(torch.tensor([0] * prefix.numel() + kinds + [0] * suffix.numel()))
    batch = _left_pad(rows, types)
    if pixels:
        batch["pixel_values"] = torch.cat(pixels).to(dtype)
        batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return batch


def _text(gen: torch.Generator, length: int) -> torch.Tensor:
    return torch.randint(*TEXT_IDS, (length,), generator=gen)


def _left_pad(rows: list[torch.Tensor], types: list[torch.Tensor]) -> dict:
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    kinds = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types)):
        ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
        kinds[i, width - r.numel() :] = t
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": kinds}


def single_row(batch: dict, row: int) -> dict:
    """Row `row` of a `build_mrope_batch` batch on its own, padding removed: the same sample the
    padded batch holds, for checking that padding and batching do not change its outputs."""
    keep = batch["attention_mask"][row].bool()
    out = {k: batch[k][row : row + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    has_image = (batch["mm_token_type_ids"] == 1).any(dim=1)
    if has_image[row]:
        image = int(has_image[:row].sum())  # one image per image row, in row order
        sizes = batch["image_grid_thw"].prod(dim=1)
        start = int(sizes[:image].sum())
        out["pixel_values"] = batch["pixel_values"][start : start + int(sizes[image])]
        out["image_grid_thw"] = batch["image_grid_thw"][image : image + 1]
    return out


def finish_tiny(model: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """Eval mode, `dtype`, and norm weights/biases moved off their 1/0 init (seeded) so that a
    transform which mishandles a norm's affine part shows up in equivalence tests."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model.to(dtype).eval()


def text_config(**extra) -> dict:
    """The small Qwen-style decoder shared by the tiny Qwen2/2.5-VL models (head_dim 16: M-RoPE
    sections sum to head_dim / 2)."""
    return {
        "vocab_size": VOCAB,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **extra,
    }


QWEN_LAYOUT = MropeLayout(IMAGE_ID, START_ID, END_ID, patch_dim=3 * 2 * 4 * 4, merge=2)
_IDS = {
    "image_token_id": IMAGE_ID, "video_token_id": VIDEO_ID,
    "vision_start_token_id": START_ID, "vision_end_token_id": END_ID,
}  # fmt: skip


def _case(family: str, model: nn.Module) -> TinyCase:
    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        return build_mrope_batch(model, QWEN_LAYOUT, batch_size, seed, text_only_row, padding)

    return TinyCase(family=family, model=model, make_batch=make_batch)


@register_tiny("qwen2_vl")
def tiny_qwen2_vl(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    vision = {
        "depth": 2, "embed_dim": 32, "hidden_size": TEXT_HIDDEN, "num_heads": 2, "mlp_ratio": 2,
        "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
    }  # fmt: skip
    config = Qwen2VLConfig(text_config=text_config(), vision_config=vision, **_IDS)
    config._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(config)
    return _case("qwen2_vl", finish_tiny(model, seed, dtype))


@register_tiny("qwen2_5_vl")
def tiny_qwen2_5_vl(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    # window_size 16 = 2 merged tokens per window side at patch 4: an 8x8-patch image has 4 windows,
    # so window attention (blocks not in fullatt_block_indexes) really differs from full attention.
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 48, "out_hidden_size": TEXT_HIDDEN, "num_heads": 2,
        "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
        "window_size": 16, "fullatt_block_indexes": [1], "hidden_act": "silu",
    }  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text_config(), vision_config=vision, **_IDS)
    config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _case("qwen2_5_vl", finish_tiny(model, seed, dtype))
