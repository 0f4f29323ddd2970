"""Recipe step "online_hadamard" (online): a Hadamard transform in front of every block's mlp_out.

`QuantLinear.online_hadamard` makes the layer compute fwht(x) = x·H (normalized H, first column
constant 1/√n) before its GEMM; the weight absorbs Hᵀ on the other side, W ← W·H, so
(xH)(WH)ᵀ = x·Wᵀ: outputs are unchanged in float. The GEMM input (the SwiGLU/GELU output, the
activation with the worst outliers) is spread over all channels, except its mean, which lands on
channel 0 (MQUANT.md §4: what the "rms" step then takes out).
"""

from __future__ import annotations

from torch import nn

from mquant.config import OnlineHadamardConfig
from mquant.core.hadamard import hadamard_matrix, hadamard_supported
from mquant.core.qlinear import QuantLinear
from mquant.errors import ConfigError
from mquant.models.spec import ModelSpec
from mquant.steps.base import Step
from mquant.steps.fold import F64


def apply_online_hadamard(module: QuantLinear) -> None:
    """Turn on the online transform of one float-state QuantLinear and compensate its weight."""
    if module.quantized or module.rms_split:
        raise ConfigError(f"{module.name}: the online Hadamard must be applied before RMS and quantization")
    h = hadamard_matrix(module.in_features, F64, module.weight.device)
    module.weight.data = (module.weight.data.to(F64) @ h).to(module.weight.dtype)
    module.online_hadamard = True


class OnlineHadamard(Step):
    """Recipe step: a run-time Hadamard before every block's MLP output linear (down_proj / fc2)."""

    config_type = OnlineHadamardConfig
    rewrites_whole_model = True

    def configure(self, model: nn.Module, adapter, spec: ModelSpec) -> dict:
        return apply_to_mlp_outputs(spec)


def apply_to_mlp_outputs(spec: ModelSpec) -> dict:
    done: list[str] = []
    skipped: dict[str, str] = {}
    for tower in spec.towers():
        for block in tower.blocks:
            ref = block.mlp_out
            module = ref.module
            if not isinstance(module, QuantLinear):
                raise ConfigError(f"{ref.name} is not wrapped; online_hadamard runs after the linears become QuantLinear")
            if module.online_hadamard:
                continue
            if not hadamard_supported(module.in_features):
                skipped[ref.name] = f"no Hadamard matrix of size {module.in_features}"
                continue
            apply_online_hadamard(module)
            done.append(ref.name)
    return {"layers": done, "skipped": skipped}
