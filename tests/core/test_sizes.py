"""`stored_bytes`: the one count of a model's bytes, as stored."""

import copy

import torch
from torch import nn

from mquant.api import quantize
from mquant.config import recipe_for
from mquant.core.sizes import stored_bytes
from mquant.core.swap import quant_linears
from mquant.kernels.attach import attach_kernels, kernel_weight_bytes
from mquant.testing.tiny import tiny_case


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: stored once
        self.pos = nn.Parameter(torch.zeros(3, 4))  # a parameter on a non-leaf module
        self.register_buffer("table", torch.zeros(5, dtype=torch.float16))
        self.register_buffer("inv_freq", torch.zeros(7), persistent=False)  # rebuilt, not stored


def test_tied_weights_once_persistent_buffers_only():
    assert stored_bytes(Tied()) == 10 * 4 * 4 + 3 * 4 * 4 + 5 * 2
    model = Tied()
    assert stored_bytes(model, exclude=[model.head]) == 3 * 4 * 4 + 5 * 2


def test_int4_codes_count_half_a_byte_and_kernels_add_their_layout():
    case = tiny_case("qwen2_vl")
    sizes = {}
    for scheme in ("w8a8", "w4a8"):
        model = copy.deepcopy(case.model)
        quantize(model, recipe_for("rtn", scheme), [case.batch(batch_size=1, seed=0)])
        sizes[scheme] = stored_bytes(model)
        attach_kernels(model)
        runners = sum(m.kernel.nbytes for m in quant_linears(model).values())
        biases = sum(m.bias.numel() * 4 for m in quant_linears(model).values() if m.bias is not None)
        rest = stored_bytes(model, exclude=quant_linears(model).values())
        assert kernel_weight_bytes(model) == rest + runners + biases
    codes = sum(m.qweight.numel() for m in quant_linears(model).values())
    assert sizes["w8a8"] - sizes["w4a8"] == codes // 2
