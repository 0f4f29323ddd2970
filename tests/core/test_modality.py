"""Row modality for MSQ: the kernels' gathered row scales equal QuantLinear.act_scale_rows."""

import torch
from torch import nn

from mquant.core.modality import TEXT, VISUAL, ModalityContext
from mquant.core.qlinear import QuantLinear
from mquant.kernels.attach import KernelRunner


def _layer(ctx: ModalityContext) -> QuantLinear:
    layer = QuantLinear(nn.Linear(8, 4))
    layer.set_quantized(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), 8, 8, False, torch.tensor([0.02, 0.5]))
    layer.modality_ctx = ctx
    return layer


def test_row_index_is_cached_per_mask_and_matches_it():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    ctx = ModalityContext(visual_mask=mask)
    index = ctx.row_index(torch.Size([2, 4]))
    assert index.tolist() == [TEXT, VISUAL, VISUAL, TEXT, VISUAL, TEXT, TEXT, TEXT]
    assert ctx.row_index(torch.Size([2, 4])) is index  # one conversion per forward, not per layer
    ctx.visual_mask = mask.clone()
    assert ctx.row_index(torch.Size([2, 4])) is not index
    assert ctx.row_index(torch.Size([2, 1])) is None  # decode step: the mask does not apply


def test_kernel_row_scales_equal_act_scale_rows():
    mask = torch.tensor([[False, True, True, False]])
    layer = _layer(ModalityContext(visual_mask=mask))
    x = torch.randn(1, 4, 8)
    expected = layer.act_scale_rows(x).reshape(-1)
    assert torch.equal(KernelRunner._static_scale(layer, x), expected)
    decode = torch.randn(1, 1, 8)  # no mask for this shape: the text scale, as one float
    assert KernelRunner._static_scale(layer, decode) == float(layer.act_scale_rows(decode))
