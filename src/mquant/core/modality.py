"""Which rows of a language-model activation are visual tokens, for modality-specific scales.

One `ModalityContext` is shared by every language-model QuantLinear of a model. A forward pre-hook
on the top-level model sets `visual_mask` from `input_ids` (placeholder ids are the visual tokens),
so prefill rows pick the visual or text scale and decode steps (text tokens) pick the text scale —
no per-token statistics at run time, only a static choice between two scalars.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT, VISUAL = 0, 1


@dataclass
class ModalityContext:
    visual_mask: torch.Tensor | None = None  # bool [batch, seq]
    # After token reordering (AIFS) the visual rows of each sequence are one contiguous block;
    # kernels may use it to run one GEMM slice per modality.
    contiguous: bool = False

    def row_index(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """row_modality flattened to int64 [rows] (TEXT = 0, VISUAL = 1), computed once per mask:
        every layer of a forward gathers its row scales with one index op instead of a where."""
        mask = self.row_modality(leading_shape)
        if mask is None:
            return None
        cached = getattr(self, "_index_cache", None)
        if cached is None or cached[0] is not mask:
            cached = (mask, mask.reshape(-1).to(torch.int64))
            self._index_cache = cached
        return cached[1]

    def row_modality(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """Bool mask matching the activation's leading dims, or None if it does not apply
        (e.g. a decode step with a different sequence length, or no mask set)."""
        mask = self.visual_mask
        if mask is None or tuple(mask.shape) != tuple(leading_shape):
            return None
        return mask


def modality_row_scales(scales: torch.Tensor, ctx: ModalityContext | None, leading_shape: torch.Size) -> torch.Tensor | None:
    """MSQ's row-scale layout, defined once: float32 [rows] holding scales[TEXT] or scales[VISUAL]
    for every row of an activation with leading dims `leading_shape`; None when no modality mask
    applies (every row then takes scales[TEXT]: decode steps are text tokens)."""
    index = ctx.row_index(leading_shape) if ctx is not None else None
    return None if index is None else scales.float().index_select(0, index)


def attach_modality_hook(model: torch.nn.Module, ctx: ModalityContext, image_token_ids: tuple[int, ...]):
    """Keep `ctx.visual_mask` in sync with each forward call of `model` (prefill and decode)."""
    ids = torch.tensor(image_token_ids)

    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor) and input_ids.dtype in (torch.long, torch.int):
            ctx.visual_mask = torch.isin(input_ids, ids.to(input_ids.device))
        else:
            ctx.visual_mask = None
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)
