"""Run-time checks and streaming for `mquant generate`."""

from __future__ import annotations

from typing import Any

from mquant.errors import InputError
from mquant.io.loading import LoadedModel


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None)


def check_prompt_fits(loaded: LoadedModel, prompt: str, max_new_tokens: int) -> None:
    """A prompt longer than the context fails before any work, with the numbers."""
    tokenizer = getattr(loaded.processor, "tokenizer", None)
    limit = _context_length(loaded.model)
    if tokenizer is None or limit is None:
        return
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    if n + max_new_tokens > limit:
        raise InputError(f"prompt is {n} tokens; with {max_new_tokens} new tokens it exceeds the model's context of {limit}; shorten it")


def text_streamer(processor: Any):
    from transformers import TextStreamer  # lazy: transformers' model/auto classes take seconds to import

    tokenizer = getattr(processor, "tokenizer", processor)
    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
