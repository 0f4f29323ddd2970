"""Language perplexity of a causal LM on text that ships with Python itself.

Why `pydoc_data.topics`: the project may not download data sets, yet a perplexity needs real
English prose. CPython bundles the language reference's help topics as a dict of prose strings,
so every install has the same text (for a given Python version) with no download. Text-only
calibration (calib/data.py) reads only what comes after the first EVAL_TEXT_CHARS characters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mquant.calib.data import EVAL_TEXT_CHARS
from mquant.errors import InputError


def offline_text_corpus(max_chars: int = EVAL_TEXT_CHARS) -> str:
    """English prose from `pydoc_data.topics`, topics in sorted-key order, joined by blank
    lines, cut to `max_chars` (the whole corpus is ~465k characters on Python 3.11)."""
    if max_chars <= 0:
        raise InputError(f"max_chars must be positive, got {max_chars}")
    try:
        # lazy: the perplexity corpus is only read for `mquant eval --task perplexity`
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Pythons (some distro "minimal" builds) drop it
        raise InputError(
            "pydoc_data is missing from this Python; install the full CPython standard library "
            "or pass your own text"
        ) from exc
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return text[:max_chars]


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` from a transformers tokenizer (no special tokens added, so windows
    are pure text) or from any callable returning ids, a tensor, or a dict with `input_ids`."""
    if hasattr(tokenizer, "encode"):
        try:
            ids: Any = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # encode() without that keyword (e.g. tokenizers.Tokenizer-like)
            ids = tokenizer.encode(text)
        ids = getattr(ids, "ids", ids)  # tokenizers.Encoding
    elif callable(tokenizer):
        ids = tokenizer(text)
    else:
        raise InputError(f"tokenizer {type(tokenizer).__name__} has no encode() and is not callable")
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):  # batched output of one text
        ids = list(ids[0])
    return [int(i) for i in ids]


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def _logits(model: Callable[..., Any], input_ids: torch.Tensor) -> torch.Tensor:
    """`model(input_ids)` may return an object with `.logits`, a tuple, or a tensor."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise InputError(
            "the model must return logits of shape [batch, seq, vocab] (or an object with .logits)"
        )
    return out


def windows(ids: Sequence[int], seq_len: int, max_windows: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `seq_len` tokens from the start of `ids`; a final
    shorter window is kept if it has at least 2 tokens (one prediction)."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    chunks = [list(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    return chunks if max_windows is None else chunks[:max_windows]


def _check_vocab(max_id: int, vocab_size: int | None) -> None:
    if vocab_size is not None and max_id >= int(vocab_size):
        raise InputError(
            f"token id {max_id} is outside the model's vocabulary of {vocab_size};"
            " use the model's own tokenizer"
        )


@torch.no_grad()
def nll_sum(model: Callable[..., Any], window_ids: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens 1..n-1 of one window given their
    prefixes, and the number of predicted tokens."""
    device = _model_device(model)
    input_ids = torch.tensor([list(window_ids)], dtype=torch.long, device=device)
    # Check before the forward pass: an embedding lookup out of range fails with a bare IndexError.
    _check_vocab(int(input_ids.max()), getattr(getattr(model, "config", None), "vocab_size", None))
    logits = _logits(model, input_ids)[0, :-1].to(torch.float64)
    if not torch.isfinite(logits).all():
        raise InputError("the model produced NaN/Inf logits; perplexity is undefined")
    targets = input_ids[0, 1:].to(logits.device)
    _check_vocab(int(targets.max()), logits.shape[-1])
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, targets[:, None]).sum()
    return float(nll), int(targets.numel())


def perplexity(
    model: Callable[..., Any],
    tokenizer: Any,
    text: str | None = None,
    seq_len: int = 256,
    max_windows: int | None = 16,
) -> float:
    """exp(mean NLL per predicted token) over the first `max_windows` windows of `seq_len`
    tokens of `text` (default: `offline_text_corpus()`). Deterministic: the same text,
    tokenizer and settings always select the same tokens. Each window is scored independently
    (no context carried across windows), the usual non-overlapping-window protocol."""
    if max_windows is not None and max_windows < 1:
        raise InputError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    ids = tokenize(tokenizer, offline_text_corpus() if text is None else text)
    chunks = windows(ids, seq_len, max_windows)
    if not chunks:
        raise InputError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()  # dropout would make the number random
    try:
        total_nll, total_tokens = 0.0, 0
        for chunk in chunks:
            nll, count = nll_sum(model, chunk)
            total_nll += nll
            total_tokens += count
    finally:
        if was_training:
            model.train()
    return math.exp(total_nll / total_tokens)
