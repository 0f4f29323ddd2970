"""Tensor helpers of AIFS: the switched token order, moving per-token tensors into and out of it,
and the permuted attention mask.

Conventions: an *order* is a LongTensor [batch, n] whose row b lists, for each slot k of the
switched sequence, the original index of the token stored there (`switched[k] = original[order[k]]`).
For the attention mask the key axis covers the KV cache too: `full_order` [batch, kv] maps every
cache slot to the original column of the 2-D padding mask.
"""

from __future__ import annotations

import torch

from mquant.errors import UnsupportedModelError

# Sort keys: padding first (so left padding stays in front), then visual, then text tokens.
_PAD, _VISUAL, _TEXT = 0, 1, 2


def switch_order(visual: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Stable order [batch, seq]: pad tokens (keep == False), then visual, then text tokens, each
    block in its original order. `visual` and `keep` are bool [batch, seq]."""
    key = torch.where(visual, _VISUAL, _TEXT)
    if keep is not None:
        key = torch.where(keep, key, _PAD)
    return torch.sort(key, dim=-1, stable=True).indices


def is_identity(order: torch.Tensor) -> bool:
    return bool(torch.equal(order, torch.arange(order.shape[-1], device=order.device).expand_as(order)))


def _index(x: torch.Tensor, order: torch.Tensor, dim: int, batch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x expanded over the batch, order shaped to broadcast against it along `dim`)."""
    dim, batch_dim = dim % x.ndim, batch_dim % x.ndim
    if batch_dim >= dim:
        raise ValueError("the batch axis must come before the token axis")
    batch, n = order.shape
    if x.shape[batch_dim] != batch:
        x = x.expand(*x.shape[:batch_dim], batch, *x.shape[batch_dim + 1 :])
    shape = [1] * x.ndim
    shape[batch_dim], shape[dim] = batch, n
    return x, order.view(shape)


def take_tokens(x: torch.Tensor, order: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Original → switched: out[..., k, ...] = x[..., order[b, k], ...] along `dim`."""
    x, idx = _index(x, order, dim, batch_dim)
    target = list(x.shape)
    target[dim % x.ndim] = order.shape[1]
    return x.gather(dim, idx.expand(target))


def restore_tokens(x: torch.Tensor, order: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Switched → original: the inverse of `take_tokens`."""
    x, idx = _index(x, order, dim, batch_dim)
    return torch.empty_like(x).scatter_(dim, idx.expand(x.shape), x)


def extend_order(order: torch.Tensor, length: int) -> torch.Tensor:
    """Append identity slots up to `length` (cache slots written in natural order)."""
    if order.shape[1] >= length:
        return order[:, :length]
    tail = torch.arange(order.shape[1], length, device=order.device).expand(order.shape[0], -1)
    return torch.cat([order, tail], dim=1)


def text_positions(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The 1-D (text) positions transformers' mask builders read: the ids themselves when 2-D, row 0
    of packed 4-row M-RoPE ids, None for plain 3-row M-RoPE ids (the models pass None then too)."""
    if position_ids is None or position_ids.ndim == 2:
        return position_ids
    if position_ids.ndim == 3 and position_ids.shape[0] == 4:
        return position_ids[0]
    return None


def switched_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values,
    position_ids: torch.Tensor | None,
    chunk_order: torch.Tensor,
    full_order: torch.Tensor,
) -> torch.Tensor:
    """The model's own causal+padding mask for the ORIGINAL order (built by transformers'
    `create_causal_mask`, so eager gets its additive float mask and sdpa its bool mask, with the
    same fully-masked-pad-row behaviour), then rows permuted by `chunk_order` and key columns by
    `full_order`: switched token i attends to cache slot k iff orig(k) <= orig(i) and k is no pad."""
    # lazy: transformers' model/auto classes take seconds to import
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        past_key_values=past_key_values,
        position_ids=text_positions(position_ids),
        allow_is_causal_skip=False,
    )
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise UnsupportedModelError(
            f"AIFS needs an explicit attention mask, but attention '{config._attn_implementation}' gives "
            f"{type(mask).__name__}; load the model with attn_implementation='sdpa' or 'eager'"
        )
    batch = inputs_embeds.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    mask = take_tokens(mask, chunk_order, dim=2)
    return take_tokens(mask, extend_order(full_order, mask.shape[-1]), dim=3)
