"""Packing several questions of one image into a sequence must not change the maths (tiny random LM)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mquant.demo.processor import DefaultProcessor
from mquant.demo.smollm import load_smollm2_tokenizer
from mquant.demo.training import Projector, add_lora, attribute_labels, aux_loss, lm_loss, pack_image


@pytest.fixture(scope="module")
def parts():
    proc = DefaultProcessor(load_smollm2_tokenizer())
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    lm = LlamaForCausalLM(cfg).eval()
    loras = add_lora(lm, rank=2, alpha=4.0)
    for mod in loras.values():
        torch.nn.init.normal_(mod.B, std=0.05)  # B=0 would hide a LoRA wiring error
    return proc, lm, Projector(torch.zeros(384), torch.ones(384))


def test_packed_equals_single_prompts(parts):
    proc, lm, proj = parts
    qas = [("what color is the shape?", "blue"), ("is there a circle?", "no"), ("what shape is present?", "triangle")]
    feats = torch.randn(1, 64, 384)
    with torch.no_grad():
        packed, ok, first = lm_loss(lm, proj, feats, [pack_image(proc, qas)], proc.image_token_id)
        singles = [lm_loss(lm, proj, feats, [pack_image(proc, [qa])], proc.image_token_id) for qa in qas]
    n = [len(s[1]) for s in singles]
    mean_single = sum(s[0].item() * k for s, k in zip(singles, n)) / sum(n)
    assert int(first.sum()) == 3 and len(ok) == sum(n)
    assert packed.item() == pytest.approx(mean_single, rel=1e-5)


def test_aux_loss_ignores_unknown_labels():
    labels = attribute_labels({0: [("what color is the shape?", "teal")], 1: [("is there a circle?", "no")]})
    assert labels.tolist() == [[5, -100], [-100, -100]]
    loss = aux_loss(torch.nn.Linear(576, 11), torch.randn(2, 64, 576), labels)
    assert torch.isfinite(loss) and loss.item() > 0
