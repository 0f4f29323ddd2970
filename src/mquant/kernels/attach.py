"""Run a quantized model's QuantLinears on the integer kernels instead of the reference path.

`attach_kernels(model)` packs every W8A8/W4A8 layer's codes once for the selected backend and
installs a runner; the runner quantizes the (already Hadamard-transformed, RMS-split) input with
the layer's static scales — the modality mask picks visual or text rows — or per token when the
layer is dynamic, runs the integer GEMM and adds bias and the RMS rank-1 term in the same call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mquant.core.modality import TEXT, modality_row_scales
from mquant.core.qlinear import QuantLinear
from mquant.core.sizes import stored_bytes
from mquant.core.swap import quant_linears
from mquant.kernels.common import InputPrologue, PreparedWeight, input_prologue, linear_dynamic, linear_static, prepare_weight
from mquant.quantizers.quantizer import pack_int4


@dataclass
class KernelRunner:
    prepared: PreparedWeight
    # Set when the backend fuses the layer's online Hadamard / RMS split (native C prologue);
    # otherwise QuantLinear.transform_input runs in PyTorch first.
    prologue: InputPrologue | None = None

    def __call__(self, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        scale = None if module.act_dynamic else self._static_scale(module, x)
        if self.prologue is not None:
            if scale is None:
                return linear_dynamic(x, self.prepared, module.bias, prologue=self.prologue)
            return linear_static(x, scale, self.prepared, module.bias, prologue=self.prologue)
        x, x0 = module.transform_input(x)
        rank1 = None if x0 is None else (x0.reshape(-1).float(), module.rms_w0.float())
        if scale is None:
            return linear_dynamic(x, self.prepared, module.bias, rank1)
        return linear_static(x, scale, self.prepared, module.bias, rank1)

    @staticmethod
    def _static_scale(module: QuantLinear, x: torch.Tensor) -> torch.Tensor | float:
        """The text scale as a float (per-tensor kernel path), or the [rows] MSQ scales: same
        values as QuantLinear.act_scale_rows, gathered with one index op."""
        rows = modality_row_scales(module.act_scale, module.modality_ctx, x.shape[:-1])
        if rows is not None:
            return rows
        text = module.act_scale[TEXT]
        return float(text) if text.device.type == "cpu" else text.reshape(1)  # no host sync on a GPU

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.prepared.data.values() if isinstance(v, torch.Tensor))


def _prepare(module: QuantLinear, backend: str | None) -> PreparedWeight:
    codes = pack_int4(module.qweight) if module.weight_bits == 4 else module.qweight
    return prepare_weight(codes, module.w_scale, backend=backend, bits=module.weight_bits)


def attach_kernels(model: nn.Module, backend: str | None = None, free_reference: bool = False,
                   fused_prologue: bool = True) -> int:
    """Install integer kernels on every quantized layer with 8-bit activations; returns the count.
    With `free_reference`, the reference path's int8 code copy is released (saves memory; the model
    can then no longer be saved or run without kernels).  `fused_prologue`: where the backend can,
    the online Hadamard and RMS split run inside the kernel call (False: in PyTorch, as before)."""
    count = 0
    for module in quant_linears(model).values():
        if not module.quantized or module.act_bits is None:
            continue
        prepared = _prepare(module, backend)
        fuse = prepared.impl.fuses_prologue and fused_prologue
        prologue = input_prologue(module.in_features, module.online_hadamard, module.rms_w0 if module.rms_split else None) if fuse else None
        module.kernel = KernelRunner(prepared, prologue)
        module._dequant_cache = None
        if free_reference:
            module.qweight = None
        count += 1
    return count


def detach_kernels(model: nn.Module) -> None:
    for module in quant_linears(model).values():
        module.kernel = None


def kernel_weight_bytes(model: nn.Module) -> int:
    """Weight bytes of the model as it runs on the kernels: each kernel layer's prepared data plus its
    bias, everything else as stored (`stored_bytes`).
    Not `stored_bytes` itself because the backend's layout is what is resident (padded, prepacked, int4 unpacked by some)."""
    layers = [m for m in quant_linears(model).values() if m.kernel is not None]
    total = stored_bytes(model, exclude=layers)
    for module in layers:
        total += module.kernel.nbytes + (0 if module.bias is None else module.bias.numel() * module.bias.element_size())
    return total
