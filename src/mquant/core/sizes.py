"""THE byte count of a model: its parameters and buffers as stored.

Every size mquant prints (`mquant demo`/`ablate` weights, `mquant bench` float rows, and the
non-kernel part of the kernel rows: `mquant.kernels.attach.kernel_weight_bytes`) comes from here.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mquant.core.qlinear import QuantLinear


def _tensor_ids(modules: Iterable[nn.Module]) -> set[int]:
    return {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}


def stored_bytes(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> int:
    """Bytes of `model`'s parameters and buffers as stored: its state_dict (as `save_quantized` writes
    it; non-persistent buffers such as rotary `inv_freq` are rebuilt, not stored), each tensor once
    (tied weights count once), 4-bit weight codes packed two per byte. Tensors of the `exclude`d
    modules are left out."""
    int4 = {id(m.qweight) for m in model.modules()
            if isinstance(m, QuantLinear) and m.quantized and m.weight_bits == 4 and m.qweight is not None}
    skip = _tensor_ids(exclude)
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen or id(tensor) in skip:
            continue
        seen.add(id(tensor))
        total += tensor.numel() // 2 if id(tensor) in int4 else tensor.numel() * tensor.element_size()
    return total
