"""Which rows of a language-model activation are visual tokens, for modality-specific scales.

One `ModalityContext` is shared by every language-model QuantLinear of a model. A forward pre-hook
on the top-level model sets `visual_mask` from `input_ids` (placeholder ids are the visual tokens),
so prefill rows pick the visual or text scale and decode steps (text tokens) pick the text scale —
no per-token statistics at run time, only a static choice between two scalars (three with MSQ's
`first_token`: a prefill's first token, the attention sink, has its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mquant.errors import ConfigError

TEXT, VISUAL, FIRST = 0, 1, 2  # FIRST: a prompt's first token, with MSQ's first_token scale


@dataclass
class ModalityContext:
    # bool [batch, seq] (visual rows), or with first-token scales int8 row classes TEXT / VISUAL / FIRST
    visual_mask: torch.Tensor | None = None
    # After token reordering (AIFS) the visual rows of each sequence are one contiguous block;
    # kernels may use it to run one GEMM slice per modality.
    contiguous: bool = False
    first_token: bool = False  # the modality hook marks each prefill's first attended token FIRST

    def row_index(self, leading_shape: torch.Size, classes: int = 2) -> torch.Tensor | None:
        """row_modality flattened to int64 [rows] indexing a layer's `classes` scales, computed once
        per mask: every layer of a forward gathers its row scales with one index op instead of a
        where. FIRST rows index TEXT where a layer has only [text, visual]."""
        mask = self.row_modality(leading_shape)
        if mask is None:
            return None
        cache = getattr(self, "_index_cache", None)
        if cache is None or cache[0] is not mask:
            cache = (mask, {})
            self._index_cache = cache
        if classes not in cache[1]:
            index = mask.reshape(-1).to(torch.int64)
            cache[1][classes] = index if classes > FIRST else torch.where(index == FIRST, TEXT, index)
        return cache[1][classes]

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
    index = ctx.row_index(leading_shape, scales.numel()) if ctx is not None else None
    return None if index is None else scales.float().index_select(0, index)


def check_two_scales(name: str, scales: torch.Tensor | None, target: str) -> None:
    """Targets that know only [text, visual] refuse a layer with a first-token scale, in one line."""
    if scales is not None and scales.numel() > 2:
        raise ConfigError(f"{name} has a first-token activation scale (MSQ first_token), which {target} cannot run yet; "
                          "serve it with mquant's own runtime, or quantize without --first-token-scale")


def first_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [batch, seq]: each row's first attended position (left padding: the first real token; it
    is the attention sink), where the running count of real tokens reaches 1. Graph ops only: the
    ONNX prefill graphs use it too."""
    return (attention_mask.cumsum(-1) == 1) & attention_mask.to(torch.bool)


def row_classes(visual: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """int8 [batch, seq] row classes of a prefill: VISUAL / TEXT, and FIRST on each row's
    `first_attended` position."""
    classes = visual.to(torch.int8)
    mask = torch.ones_like(visual, dtype=torch.long) if attention_mask is None else attention_mask
    return classes.masked_fill(first_attended(mask), FIRST)


def _is_prefill(kwargs: dict) -> bool:
    past = kwargs.get("past_key_values")
    if past is None:
        return True
    length = getattr(past, "get_seq_length", None)
    return length is not None and int(length()) == 0


def attach_modality_hook(model: torch.nn.Module, ctx: ModalityContext, image_token_ids: tuple[int, ...]):
    """Keep `ctx.visual_mask` in sync with each forward call of `model` (prefill and decode)."""
    ids = torch.tensor(image_token_ids)

    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor) and input_ids.dtype in (torch.long, torch.int):
            ctx.visual_mask = torch.isin(input_ids, ids.to(input_ids.device))
            if ctx.first_token:  # decode steps have no first token: bool mask, all TEXT rows
                mask = kwargs.get("attention_mask")
                if _is_prefill(kwargs):
                    # the mask covers past + new tokens; a prefill has no past: its columns are these
                    same = isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape
                    ctx.visual_mask = row_classes(ctx.visual_mask, mask if same else None)
        else:
            ctx.visual_mask = None
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)
