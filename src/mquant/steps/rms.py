"""Recipe step "rms" (pre_quant hook): rotation magnitude suppression (MQUANT.md §4).

After the online Hadamard, channel 0 of a layer's input is Σx/√n — the input's mean direction,
a massive outlier after GELU/SwiGLU — and column 0 of its weight is √n·mean_over_inputs(W).
`QuantLinear.enable_rms_split` takes that channel out of the quantized GEMM and computes it as a
float rank-1 term (x₀·w₀): exact in float. Applied to every online-rotated linear of the block
whose measured outlier ratio (max / median channel |x|, from the float statistics pass) exceeds
`RMSConfig.threshold` (all of them when the threshold is None, as the authors' code does); the
ratio before is kept on the module, so the report shows it next to the ratio re-measured after.
"""

from __future__ import annotations

from mquant.config import RMSConfig
from mquant.core.qlinear import QuantLinear
from mquant.models.spec import BlockSpec, ProjectorSpec
from mquant.steps.base import Step


class RMS(Step):
    """Recipe step: split channel 0 off online-rotated linears before their weights quantize."""

    config_type = RMSConfig

    def before_quant(self, block, stats: dict, records: list) -> bool:
        return split_block(block, stats, self.config.threshold)


def split_block(block: BlockSpec | ProjectorSpec, stats: dict, threshold: float | None = None) -> bool:
    """Split channel 0 off the block's online-rotated linears; True when something changed.
    `stats` maps group index → calib.stats.GroupStats (read for its outlier ratio)."""
    changed = False
    for index, group in enumerate(block.groups):
        group_stats = stats.get(index)
        if group_stats is None or group_stats.absmax_channel is None:
            continue
        ratio = group_stats.outlier_ratio()
        for ref in group.linears:
            module = ref.module
            if not isinstance(module, QuantLinear) or not module.online_hadamard or module.rms_split:
                continue
            if threshold is not None and ratio <= threshold:
                continue
            module.outlier_ratio_before = ratio
            module.enable_rms_split()
            changed = True
    return changed
