"""The Qwen2-VL family's ONNX pieces (model_type "qwen2_vl"): the vision graph and the M-RoPE
position ids the runner feeds to prefill and decode.

Vision: one image per call, its patch grid (t, h, w) fixed when the graph is exported. The tower's
rotary positions are a loop over the grid and its attention splits the patches per image by
`cu_seqlens` (`.tolist()`): both are data-dependent on grid_thw, so as a graph input they would not
trace. Fixed, they are export-time constants and each graph has one static shape; an export holds one
vision graph per grid it was asked for (`export_onnx(..., image_grids=)`), and the runner runs each
image through the graph of its grid.

Language: position ids [3, batch, seq] (temporal, height, width) are a graph input, computed on the
host by `mrope_positions` exactly as transformers' `get_rope_index` does (text advances by 1, an
image's merged tokens take start + (t, h, w), text resumes at start + max(h, w) / merge, padding
gets 0). Decode continues each row from its largest position + 1 (transformers' rope_deltas).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mquant.io.onnx_decoder import DecodeGraph, PrefillGraph

Grid = tuple[int, int, int]


def grid_name(grid: Grid) -> str:
    return "vision_" + "x".join(str(int(g)) for g in grid)


def patch_dim(model: nn.Module) -> int:
    vision = model.config.vision_config
    return vision.in_channels * vision.temporal_patch_size * vision.patch_size**2


class GridVisionGraph(nn.Module):
    """Flattened patches of one image [t*h*w, patch_dim] -> merged features [t*h*w / merge², hidden]."""

    def __init__(self, model: nn.Module, grid: Grid):
        super().__init__()
        self.visual = model.model.visual
        self.grid = tuple(int(g) for g in grid)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Created here, from Python ints: torch.export keeps them as constants (a buffer would be
        # traced symbolically and the tower's `.tolist()` would fail).
        grid_thw = torch.tensor([self.grid])
        t, h, w = self.grid
        cu_seqlens = torch.tensor([h * w * i for i in range(t + 1)], dtype=torch.int32)  # one segment per frame
        return self.visual(pixel_values, grid_thw=grid_thw, cu_seqlens=cu_seqlens).pooler_output


class MropePrefillGraph(PrefillGraph):
    def forward(self, input_ids, attention_mask, image_features, position_ids):
        return self.prefill(input_ids, attention_mask, image_features, position_ids)


class MropeDecodeGraph(DecodeGraph):
    def forward(self, input_ids, attention_mask, past_attention_mask, position_ids, *past):
        return self.decode(input_ids, attention_mask, past_attention_mask, past, position_ids)


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, grids: np.ndarray, image_token_id: int,
                    merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(position ids [3, batch, seq], next position [batch]); `grids` [images, 3] in row order."""
    batch, seq = input_ids.shape
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    following = np.zeros(batch, dtype=np.int64)
    images = iter(np.asarray(grids, dtype=np.int64).reshape(-1, 3))
    for row in range(batch):
        real = np.flatnonzero(attention_mask[row])
        ids, parts, start, i = input_ids[row, real], [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                parts.append(np.full((3, 1), start))
                start, i = start + 1, i + 1
                continue
            t, h, w = next(images)
            gt, gh, gw = t, h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + start)
            start, i = start + max(gh, gw), i + gt * gh * gw
        row_pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
        positions[:, row, real] = row_pos
        following[row] = row_pos.max() + 1 if row_pos.size else 0
    return positions, following


def decode_positions(following: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
    """Positions of new tokens [3, batch, new]: each row continues from `following` (padding 0)."""
    steps = following[:, None] + np.cumsum(new_mask, axis=1) - 1
    steps = np.where(new_mask > 0, steps, 0)
    return np.broadcast_to(steps, (3, *steps.shape)).astype(np.int64).copy()
