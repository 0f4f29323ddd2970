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
from mquant.core.hadamard import fwht, hadamard_supported
from mquant.core.qlinear import QuantLinear
from mquant.errors import ConfigError
from mquant.models.spec import BlockSpec, ModelSpec, TowerSpec
from mquant.steps.base import Step
from mquant.steps.fold import edit_along


def apply_online_hadamard(module: QuantLinear) -> None:
    """Turn on the online transform of one float-state QuantLinear and compensate its weight."""
    if module.quantized or module.rms_split:
        raise ConfigError(f"{module.name}: the online Hadamard must be applied before RMS and quantization")
    # W ← W·H row by row with the fast transform (fwht(w) = w·H): no dense n×n matrix, which
    # for a 7B down_proj (n = 18944) would be 2.9 GB of float64.
    edit_along(module.weight, 1, fwht)
    module.online_hadamard = True


class OnlineHadamard(Step):
    """Recipe step: a run-time Hadamard before every block's MLP output linear (down_proj / fc2)."""

    config_type = OnlineHadamardConfig

    def configure(self, model: nn.Module, adapter, spec: ModelSpec) -> dict:
        self.info = {"layers": [], "skipped": {}}
        return self.info

    def configure_block(self, model: nn.Module, spec: ModelSpec, tower: TowerSpec, block: BlockSpec) -> None:
        apply_to_mlp_output(block, self.info)


def apply_to_mlp_output(block: BlockSpec, info: dict) -> None:
    """One block's part (its own mlp_out only: a streamed model runs it when the block loads)."""
    ref = block.mlp_out
    module = ref.module
    if not isinstance(module, QuantLinear):
        raise ConfigError(f"{ref.name} is not wrapped; online_hadamard runs after the linears become QuantLinear")
    if module.online_hadamard:
        return
    if not hadamard_supported(module.in_features):
        info["skipped"][ref.name] = f"no Hadamard matrix of size {module.in_features}"
        return
    apply_online_hadamard(module)
    info["layers"].append(ref.name)
