"""Perplexity on the bundled offline corpus, checked against hand-computed exp(mean NLL)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from mquant.errors import InputError
from mquant.eval.perplexity import offline_text_corpus, perplexity, tokenize, windows

VOCAB = 128


def byte_tokenizer(text: str) -> list[int]:
    """Minimal byte-level tokenizer: one id per UTF-8 byte, folded into a 128-token vocabulary."""
    return [b % VOCAB for b in text.encode("utf-8")]


class EncodeTokenizer:
    """Stand-in for a transformers tokenizer: `.encode(text, add_special_tokens=...)`."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + byte_tokenizer(text)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_offline_corpus_is_deterministic_prose() -> None:
    text = offline_text_corpus(5000)
    assert len(text) == 5000
    assert text == offline_text_corpus(5000)
    assert offline_text_corpus(10_000).startswith(text)
    assert sum(ch.isalpha() for ch in text) > 0.6 * len(text)  # prose, not code or data
    with pytest.raises(InputError):
        offline_text_corpus(0)


def test_perplexity_equals_exp_mean_nll_by_hand(tiny_llama: LlamaForCausalLM) -> None:
    text = offline_text_corpus(4000)
    seq_len, max_windows = 32, 3
    got = perplexity(tiny_llama, byte_tokenizer, text, seq_len=seq_len, max_windows=max_windows)

    ids = byte_tokenizer(text)[: seq_len * max_windows]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            window = torch.tensor([ids[start : start + seq_len]])
            logits = tiny_llama(window).logits[0]
            total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
            count += seq_len - 1
    assert count == 93
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)
    # a random tiny model is near-uniform over 128 tokens
    assert 64 < got < 256


def test_uniform_model_has_perplexity_vocab_size() -> None:
    def uniform(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, VOCAB)

    assert perplexity(uniform, byte_tokenizer, "some english text here", seq_len=8) == pytest.approx(VOCAB)


def test_windows_and_tokenizer_forms(tiny_llama: LlamaForCausalLM) -> None:
    assert windows(list(range(10)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 1-token tail dropped
    assert windows(list(range(10)), 4, 1) == [[0, 1, 2, 3]]
    # transformers-style encode() is called without special tokens; dict outputs are unwrapped
    assert tokenize(EncodeTokenizer(), "ab") == [97, 98]
    assert tokenize(lambda t: {"input_ids": torch.tensor([[5, 6]])}, "x") == [5, 6]
    text = offline_text_corpus(600)
    a = perplexity(tiny_llama, EncodeTokenizer(), text, seq_len=64, max_windows=4)
    b = perplexity(tiny_llama, byte_tokenizer, text, seq_len=64, max_windows=4)
    assert a == pytest.approx(b, rel=1e-9)


def test_training_mode_is_restored(tiny_llama: LlamaForCausalLM) -> None:
    tiny_llama.train()
    try:
        perplexity(tiny_llama, byte_tokenizer, "hello there world", seq_len=8)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_bad_inputs(tiny_llama: LlamaForCausalLM) -> None:
    with pytest.raises(InputError, match="seq_len"):
        perplexity(tiny_llama, byte_tokenizer, "hello", seq_len=1)
    with pytest.raises(InputError, match="at least 2"):
        perplexity(tiny_llama, byte_tokenizer, "h", seq_len=8)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        perplexity(tiny_llama, lambda t: [1, 200, 3], "x", seq_len=8)
    with pytest.raises(InputError, match="vocabulary of 4"):  # a plain callable: checked on logits
        perplexity(lambda ids: torch.zeros(*ids.shape, 4), lambda t: [1, 7, 3], "x", seq_len=8)
    with pytest.raises(InputError, match="max_windows"):
        perplexity(tiny_llama, byte_tokenizer, "hello", max_windows=0)
