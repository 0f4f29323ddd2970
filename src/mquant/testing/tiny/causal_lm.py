"""Tiny text-only causal LMs: `llama` (tied embeddings, SmolLM2-style), `qwen2` (q/k/v biases,
untied) and `qwen3` (per-head q/k RMSNorms), 2 layers, hidden 64, 4 heads / 2 KV heads.

Batches are text rows from the shared builder (left-padded when `padding`); `text_only_row` changes
nothing, every row is text. The decoder runs SDPA: see `tiny.llava.set_attention` (eager attention
turns fully masked float64 padding rows into NaN).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from mquant.testing.tiny import TinyCase, register_tiny
from mquant.testing.tiny.llava import PAD_ID, VOCAB, image_text_batch, perturb_affines, tiny_llama

_SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": PAD_ID}


def _case(family: str, model: nn.Module, seed: int, dtype: torch.dtype) -> TinyCase:
    model.config._attn_implementation = "sdpa"
    perturb_affines(model, seed)
    model = model.to(dtype).eval()

    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        ids, mask, _ = image_text_batch(batch_size, seed, True, padding, [])
        return {"input_ids": ids, "attention_mask": mask}

    return TinyCase(family, model, make_batch)


@register_tiny("llama")
def tiny_llama_lm(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    torch.manual_seed(seed)
    return _case("llama", LlamaForCausalLM(tiny_llama(tie=True)), seed, dtype)


@register_tiny("qwen2")
def tiny_qwen2_lm(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    torch.manual_seed(seed)
    return _case("qwen2", Qwen2ForCausalLM(Qwen2Config(**_SHAPE, tie_word_embeddings=False)), seed, dtype)


@register_tiny("qwen3")
def tiny_qwen3_lm(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    torch.manual_seed(seed)
    return _case("qwen3", Qwen3ForCausalLM(Qwen3Config(**_SHAPE, head_dim=16, tie_word_embeddings=False)), seed, dtype)
