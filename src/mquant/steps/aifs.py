"""AIFS — attention-invariant flexible switching (MQUANT.md §2), as a runtime transform.

On every forward of the language model (the decoder stack `spec.language.module`) the new tokens of
each sequence are reordered to `[pad][visual][text]`, so that modality-specific static scales (MSQ)
see one contiguous visual block and one contiguous text block per row: one GEMM slice, one scalar
scale each. The reordering is exact, not an approximation: every op but attention is row-wise, and
attention stays the same because each token keeps its original position ids (1-D RoPE or all rows of
M-RoPE ids) and the mask is the original causal+padding mask with rows and key columns permuted.

Mechanics (hooks, nothing patched):
- a forward pre-hook on the top-level model reads `input_ids` and records the visual-token mask;
- a pre-hook on the language model permutes `inputs_embeds`, `position_ids` (materialised when the
  model would have built them), every other per-token tensor argument ([batch, seq, ...], e.g.
  Qwen3-VL's `visual_pos_masks`) and replaces `attention_mask` by the permuted explicit 4-D mask;
  it also permutes the shared ModalityContext mask and sets `ctx.contiguous`;
- a forward hook on the language model un-permutes `last_hidden_state`, `hidden_states` and
  `attentions`, and stores on the returned KV cache which original token each cache slot holds.
Decode steps (one text token, nothing to permute) then get a mask built from the original 2-D
padding mask with its columns mapped to the switched cache, so they see every cached non-pad token;
their position ids are untouched, so they continue the original positions and `generate()` yields
the same tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mquant.config import AIFSConfig
from mquant.core.state import modality_context
from mquant.errors import UnsupportedModelError
from mquant.models.registry import get_adapter
from mquant.steps.aifs_mask import extend_order, is_identity, restore_tokens, switch_order, switched_mask, take_tokens
from mquant.steps.base import Step

_ATTR = "_mquant_aifs"
_CACHE_ATTR = "_mquant_aifs_order"  # on a transformers Cache: original column of each cache slot
_MASK_ATTENTION = ("eager", "sdpa")


@dataclass
class _Call:
    """What the language-model pre-hook decided, for its forward hook to undo."""

    batch: int
    seq: int
    chunk_order: torch.Tensor | None  # [batch, seq] switched -> original, None: not permuted
    full_order: torch.Tensor  # [batch, cache + seq]
    ctx_saved: tuple[Any, bool] | None = None  # (visual_mask, contiguous) to restore


@dataclass
class AIFSHandle:
    model: nn.Module
    language: nn.Module
    image_token_ids: torch.Tensor
    visual_mask: torch.Tensor | None = None  # from the current top-level call's input_ids
    call: _Call | None = None
    hooks: list = field(default_factory=list)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def enable_aifs(model: nn.Module, adapter=None) -> AIFSHandle:
    """Install AIFS on `model` (float or quantized). Idempotent: a second call replaces the first."""
    disable_aifs(model)
    if adapter is None:
        adapter = get_adapter(model)
    spec = adapter.validate(model)
    language = spec.language.module
    _check_language(language)
    handle = AIFSHandle(model, language, torch.tensor(spec.image_token_ids, dtype=torch.long))
    handle.hooks = [
        model.register_forward_pre_hook(_top_pre_hook(handle), with_kwargs=True),
        language.register_forward_pre_hook(_lm_pre_hook(handle), with_kwargs=True),
        language.register_forward_hook(_lm_post_hook(handle), with_kwargs=True, always_call=True),
    ]
    setattr(model, _ATTR, handle)
    return handle


def disable_aifs(model: nn.Module) -> bool:
    """Remove AIFS from `model`; True if it was installed. KV caches filled while AIFS was on hold the
    switched order and must not be reused afterwards."""
    handle = getattr(model, _ATTR, None)
    if handle is None:
        return False
    handle.remove()
    delattr(model, _ATTR)
    return True


def aifs_enabled(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


class AIFS(Step):
    """Recipe step: install the run-time token reordering (after quantization and after loading)."""

    config_type = AIFSConfig

    def install(self, model: nn.Module, adapter, spec) -> dict:
        return install_aifs(model, adapter, spec)


def install_aifs(model: nn.Module, adapter, spec) -> dict:
    handle = enable_aifs(model, adapter)
    return {
        "language_module": spec.language.name,
        "attn_implementation": handle.language.config._attn_implementation,
        "image_token_ids": list(spec.image_token_ids),
    }


def _check_language(language: nn.Module) -> None:
    config = getattr(language, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _MASK_ATTENTION:
        raise UnsupportedModelError(
            f"AIFS needs an explicit attention mask, which attention '{impl}' cannot take; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise UnsupportedModelError(
            f"AIFS supports full causal attention only; the language model has layer types {sorted(kinds)}; "
            "drop 'aifs' from the recipe"
        )


# ---- hooks ------------------------------------------------------------------------------------
def _top_pre_hook(handle: AIFSHandle):
    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and not input_ids.is_floating_point():
            handle.visual_mask = torch.isin(input_ids, handle.image_token_ids.to(input_ids.device))
        else:
            handle.visual_mask = None  # e.g. inputs_embeds only: the modality is unknown, no switch
        return None

    return hook


def _lm_pre_hook(handle: AIFSHandle):
    def hook(module, args, kwargs):
        handle.call = None
        if args:  # normalise a positional call so every argument can be found by name
            kwargs = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None  # token ids in: the VLM did not merge images, nothing modality-specific
        batch, seq = embeds.shape[:2]
        past = kwargs.get("past_key_values")
        cached = _cache_order(past, batch)
        visual, handle.visual_mask = handle.visual_mask, None
        chunk = _chunk_order(visual, kwargs.get("attention_mask"), cached, batch, seq)
        if cached is None and chunk is None:
            return ((), kwargs) if args else None
        device = embeds.device
        prev = cached if cached is not None else torch.arange(0, device=device).expand(batch, 0)
        order = chunk if chunk is not None else torch.arange(seq, device=device).expand(batch, -1)
        full = torch.cat([prev.to(device), order + prev.shape[1]], dim=1)
        new = dict(kwargs)
        new["attention_mask"] = switched_mask(
            module.config, embeds, kwargs.get("attention_mask"), past, kwargs.get("position_ids"), order, full
        )
        call = _Call(batch, seq, chunk, full)
        if chunk is not None:
            _switch_inputs(new, kwargs, chunk, batch, seq, past)
            call.ctx_saved = _switch_context(handle.model, chunk, batch, seq)
        handle.call = call
        return (), new

    return hook


def _lm_post_hook(handle: AIFSHandle):
    def hook(_module, _args, _kwargs, output):
        call, handle.call = handle.call, None
        if call is None:
            return None
        if call.ctx_saved is not None:
            ctx = modality_context(handle.model)
            ctx.visual_mask, ctx.contiguous = call.ctx_saved
        if output is None:  # the forward raised; always_call hooks still restore the context
            return None
        cache = _get(output, "past_key_values")
        if cache is not None:
            setattr(cache, _CACHE_ATTR, call.full_order)
        if call.chunk_order is not None:
            _restore_outputs(output, call)
        return output

    return hook


# ---- pieces -------------------------------------------------------------------------------------
def _cache_order(past, batch: int) -> torch.Tensor | None:
    """Original column of each slot already in the cache, or None when the cache is in natural
    order (empty, or filled without AIFS)."""
    if past is None:
        return None
    length = past.get_seq_length()
    order = getattr(past, _CACHE_ATTR, None)
    if order is None or length == 0:
        return None
    if order.shape[0] != batch:
        raise UnsupportedModelError(
            f"the KV cache was filled with AIFS for batch {order.shape[0]} but is used with batch {batch}; "
            "start a new cache (or disable AIFS for beam/batch-changing decoding)"
        )
    return extend_order(order, length)


def _chunk_order(visual, attention_mask, cached, batch: int, seq: int) -> torch.Tensor | None:
    """Switched order of the new tokens, or None when there is nothing to switch."""
    if seq < 2 or visual is None or tuple(visual.shape) != (batch, seq) or not bool(visual.any()):
        return None
    keep = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        keep = attention_mask[:, -seq:].to(torch.bool)
    order = switch_order(visual.to(keep.device if keep is not None else visual.device), keep)
    return None if is_identity(order) else order


def _switch_inputs(new: dict, old: dict, chunk: torch.Tensor, batch: int, seq: int, past) -> None:
    """Permute every per-token input; position ids are materialised first so each token keeps the
    id the model would have given it."""
    chunk = chunk.to(old["inputs_embeds"].device)
    new["inputs_embeds"] = take_tokens(old["inputs_embeds"], chunk, dim=1)
    positions = old.get("position_ids")
    if positions is None:
        start = past.get_seq_length() if past is not None else 0
        positions = (torch.arange(seq, device=chunk.device) + start).expand(batch, -1)
    new["position_ids"] = take_tokens(positions, chunk, dim=-1, batch_dim=-2)
    skip = {"inputs_embeds", "position_ids", "attention_mask", "past_key_values"}
    for name, value in old.items():
        if name not in skip and isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (batch, seq):
            new[name] = take_tokens(value, chunk, dim=1)


def _switch_context(model: nn.Module, chunk: torch.Tensor, batch: int, seq: int) -> tuple[Any, bool] | None:
    """Put the MSQ modality mask into the switched order; return what to restore afterwards."""
    ctx = modality_context(model)
    if ctx is None:
        return None
    saved = (ctx.visual_mask, ctx.contiguous)
    mask = ctx.visual_mask
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, seq):
        ctx.visual_mask = take_tokens(mask, chunk.to(mask.device), dim=1)
        ctx.contiguous = True
    return saved


def _get(output, name: str):
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        return output.get(name)
    return None


def _restore_outputs(output, call: _Call) -> None:
    """Outputs back in the original token order (the cache keeps the switched order)."""
    chunk, batch, seq = call.chunk_order, call.batch, call.seq

    def back(t):
        if isinstance(t, torch.Tensor) and t.ndim >= 2 and tuple(t.shape[:2]) == (batch, seq):
            return restore_tokens(t, chunk.to(t.device), dim=1)
        return t

    if isinstance(output, dict):
        if output.get("last_hidden_state") is not None:
            output["last_hidden_state"] = back(output["last_hidden_state"])
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(back(h) for h in output["hidden_states"])
        if output.get("attentions") is not None:
            output["attentions"] = tuple(_restore_attention(a, call) for a in output["attentions"])


def _restore_attention(weights: torch.Tensor, call: _Call) -> torch.Tensor:
    """[batch, heads, seq, kv] probabilities: query rows and key columns back to original order."""
    if weights is None or weights.ndim != 4 or weights.shape[2] != call.seq:
        return weights
    weights = restore_tokens(weights, call.chunk_order.to(weights.device), dim=2)
    return restore_tokens(weights, extend_order(call.full_order, weights.shape[-1]).to(weights.device), dim=3)
