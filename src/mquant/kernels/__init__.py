"""Integer kernels (CPU; CUDA through Triton): W8A8 and W4A8 GEMMs with static (per tensor / per
row block) or dynamic per-token activation quantization, all int-exact against `reference.reference_linear`.

    prepared = prepare_weight(codes, w_scale, bits=4)           # once, at load time
    y = linear_static(x, x_scale_or_row_blocks, prepared, bias)  # MQuant: static scales
    y = linear_dynamic(x, prepared, bias)                        # per-token baseline
    y = linear_static(x, s, prepared, bias, prologue=input_prologue(K, True, rms_w0))
                                      # MQuant's online Hadamard + RMS split fused (native backend)
CUDA tensors select the `triton` backend (triton_gpu.py) automatically.
"""

# Importing a backend module registers it; triton_gpu imports triton only when a kernel runs.
from mquant.kernels import int8_cpu, triton_gpu  # noqa: F401
from mquant.kernels.common import (
    InputPrologue,
    PreparedWeight,
    available_backends,
    input_prologue,
    linear_dynamic,
    linear_static,
    prepare_weight,
    select_backend,
)
from mquant.kernels.packing import pack_int4, unpack_int4
from mquant.kernels.reference import reference_linear, reference_linear_float
from mquant.kernels.w4a8 import native_isa

__all__ = ["InputPrologue", "input_prologue", "PreparedWeight", "available_backends", "linear_dynamic", "linear_static", "native_isa", "pack_int4",
           "prepare_weight", "reference_linear", "reference_linear_float", "select_backend", "unpack_int4"]
