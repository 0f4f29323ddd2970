"""Sequential, block-by-block calibration and quantization.

For each block: run it in float on the captured inputs while observers and Hessians watch every
activation-quantization point; quantize its weights (RTN/GPTQ) and fix its activation scales; run
the *quantized* block to produce the next block's inputs. Errors of early blocks are therefore seen
by later ones, and only one block's activations are alive at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mquant.calib.capture import BlockInput, block_output
from mquant.calib.checkpoint import CalibrationCheckpoint
from mquant.calib.report import LayerRecord
from mquant.calib.stats import AUTO_OBSERVER, GroupStats
from mquant.calib.validation import ErrorProbe, OverflowProbe, choose_observers, run_with_hooks
from mquant.config import GPTQConfig, Recipe, SchemeConfig
from mquant.core.modality import ModalityContext
from mquant.core.qlinear import QuantLinear, dequantize_weight
from mquant.errors import CalibrationError
from mquant.models.spec import BlockSpec, LinearGroup, ProjectorSpec
from mquant.quantizers.weights import quantize_weight
from mquant.steps.base import Step


@dataclass
class SequentialCalibrator:
    recipe: Recipe
    # The recipe's steps: `modality_specific` decides MSQ statistics, `before_quant` may edit a
    # block between its statistics pass and quantization (SmoothQuant, RMS).
    steps: list[Step]
    ctx: ModalityContext
    progress: Callable[[str, int], None] | None = None
    records: list[LayerRecord] = field(default_factory=list)
    last_validation: list | None = None  # the last calibrated block's outputs on the validation split
    # With a checkpoint, finished blocks are saved, and on a rerun restored instead of recalibrated.
    checkpoint: CalibrationCheckpoint | None = None
    # Called with each block (spec) before it is calibrated or restored: an offloaded model loads
    # the block's weights here and makes the steps' per-block float edits (calib/offload.py); it
    # returns the block's re-read spec when those edits replaced modules, else None.
    before_block: Callable[[object], object | None] | None = None

    def run_blocks(
        self,
        blocks: list[BlockSpec | ProjectorSpec],
        inputs: list[BlockInput | None],
        scheme: SchemeConfig,
        part: str,
        masks: list[torch.Tensor | None] | None = None,
        validation: tuple[list[BlockInput | None], list[torch.Tensor | None] | None] | None = None,
    ) -> list[torch.Tensor | None]:
        """Calibrate and quantize `blocks` in order; return the last block's quantized outputs.
        `validation` (inputs, masks) of held-out samples: never observed; each quantized block runs
        them (range overflow, observer "auto") and passes them on to the next block."""
        masks = masks if masks is not None else [None] * len(inputs)
        val_inputs, val_masks = validation if validation is not None else (None, None)
        val_masks = val_masks if val_masks is not None else [None] * len(val_inputs or [])
        outputs: list[torch.Tensor | None] = []
        for index, block in enumerate(blocks):
            runner = functools.partial(self._run, block.module, inputs, masks)
            val_runner = functools.partial(self._run, block.module, val_inputs, val_masks) if val_inputs else None
            outputs = self.calibrate(f"{part}-{index:04d}", block, runner, scheme, part, val_runner)
            inputs = [None if inp is None else inp.with_hidden(out) for inp, out in zip(inputs, outputs)]
            if val_inputs:
                val_inputs = [None if inp is None else inp.with_hidden(out) for inp, out in zip(val_inputs, self.last_validation)]
            if self.progress is not None:
                self.progress(f"{part} {index + 1}/{len(blocks)}", 1)
        return outputs

    def calibrate(self, block_id: str, block, runner: Callable[[], object], scheme: SchemeConfig, part: str,
                  val_runner: Callable[[], object] | None = None):
        """`process_with_runner`, or — when the checkpoint already holds `block_id` — restore the
        block's quantized state and only run `runner()` (a restored block still produces the next
        block's inputs). With a checkpoint, a freshly calibrated block is saved before returning."""
        if self.before_block is not None:
            block = self.before_block(block) or block  # a block edited on loading comes back re-read
        if self.checkpoint is not None and self.checkpoint.has(block_id):
            self.records.extend(self.checkpoint.load_block(block_id, block))
            self.last_validation = val_runner() if val_runner is not None else None
            return runner()
        first_record = len(self.records)
        outputs = self.process_with_runner(block, runner, scheme, part, val_runner)
        if self.checkpoint is not None:
            self.checkpoint.save_block(block_id, block, self.records[first_record:])
        return outputs

    def _run(self, module: nn.Module, inputs: list[BlockInput | None], masks: list) -> list[torch.Tensor | None]:
        outs = []
        with torch.no_grad():
            for inp, mask in zip(inputs, masks):
                if inp is None:
                    outs.append(None)
                    continue
                self.ctx.visual_mask = mask
                outs.append(block_output(module(*inp.args, **inp.kwargs)))
        self.ctx.visual_mask = None
        return outs

    def _collect(self, block, runner: Callable[[], object], part: str) -> dict[int, GroupStats]:
        per_modality = any(step.modality_specific(part) for step in self.steps)
        first_token = any(step.first_token_scale(part) for step in self.steps)
        need_hessian = isinstance(self.recipe.weights, GPTQConfig)
        stats: dict[int, GroupStats] = {}
        for gi, group in enumerate(block.groups):
            stats[gi] = GroupStats(self.recipe.observer, per_modality, need_hessian, self.ctx, first_token)
            group.linears[0].module.input_observer = stats[gi]
        try:
            runner()
        finally:
            for group in block.groups:
                group.linears[0].module.input_observer = None
        return stats

    def process_with_runner(self, block, runner: Callable[[], object], scheme: SchemeConfig, part: str,
                            val_runner: Callable[[], object] | None = None):
        """Calibrate and quantize `block`'s groups; `runner()` executes every calibration sample
        through them (a captured block call, or whole-model forwards for a projector whose parts
        run at different places, like Qwen3-VL's DeepStack mergers)."""
        records: list[LayerRecord] = []
        stats = self._collect(block, runner, part)
        for step in self.steps:
            if step.before_quant(block, stats, records):  # the step changed the block: observe again
                stats = self._collect(block, runner, part)
        probes: dict[QuantLinear, ErrorProbe] = {}
        candidates = []
        for gi, group in enumerate(block.groups):
            if stats[gi].rows_seen == 0:
                raise CalibrationError(f"{group.linears[0].module.name} never ran on the calibration samples; add samples with images")
            candidates.append(stats[gi].candidate_scales() if self.recipe.observer == AUTO_OBSERVER else None)
            # popped: a group's Hessian (in×in, 1.4 GB for a 7B down_proj) is freed once it is quantized
            self._quantize_group(group, stats.pop(gi), scheme, part, probes, records)
        static = scheme.act_bits is not None and not scheme.act_dynamic
        if static and val_runner is not None:
            self._validate(block, candidates, probes, val_runner, records)
        else:
            self.last_validation = val_runner() if val_runner is not None else None
        outputs = run_with_hooks(probes, runner)
        for record in records:
            probe = next((p for m, p in probes.items() if m.name == record.name), None)
            if probe is not None and probe.den > 0:
                record.output_error = (probe.num / probe.den) ** 0.5
                record.act_error = (probe.act_num / max(probe.act_den, 1e-30)) ** 0.5
        self.records.extend(records)
        return outputs

    def _validate(self, block, candidates, probes, val_runner, records) -> None:
        """Observer "auto" picks each group's scales on the validation split; then the overflow of
        the final scales is measured on it, and its outputs kept for the next block."""
        if candidates and candidates[0] is not None:
            chosen, errors = choose_observers(block.groups, candidates, probes, val_runner)
            by_name = {ref.module.name: (name, errs) for group, name, errs in zip(block.groups, chosen, errors) for ref in group.linears}
            for record in records:
                record.observer, record.observer_errors = by_name.get(record.name, (record.observer, None))
            for group in block.groups:  # the report shows the scales in use
                for ref in group.linears:
                    next(r for r in records if r.name == ref.module.name).act_scale = [float(v) for v in ref.module.act_scale]
        overflow = {m: OverflowProbe() for m in probes}
        self.last_validation = run_with_hooks(overflow, val_runner)
        for record in records:
            probe = next((p for m, p in overflow.items() if m.name == record.name), None)
            if probe is not None and probe.values:
                record.range_overflow, record.range_overflow_max = probe.over / probe.values, probe.max_ratio

    def _quantize_group(self, group: LinearGroup, stats: GroupStats, scheme, part, probes, records) -> None:
        act_scale = stats.act_scale() if scheme.act_bits is not None and not scheme.act_dynamic else None
        hessian = stats.hessian.hessian if stats.hessian is not None else None
        for ref in group.linears:
            module: QuantLinear = ref.module
            weight = module.float_weight_for_quantization()
            codes, scale = quantize_weight(weight, scheme, self.recipe.weights, hessian)
            deq = dequantize_weight(codes, scale, torch.float32)
            w_err = float((deq - weight.float()).norm() / weight.float().norm().clamp_min(1e-30))
            # The probe keeps the float weight itself, not a copy: set_quantized only drops the
            # layer's reference to it, so the block's float weights are held once, not twice.
            probes[module] = ErrorProbe(weight, None if module.bias is None else module.bias.detach().clone())
            module.set_quantized(codes, scale, scheme.weight_bits, scheme.act_bits, scheme.act_dynamic, act_scale)
            records.append(
                LayerRecord(
                    name=module.name,
                    part=part,
                    role=group.role,
                    scheme=scheme.name + ("-dyn" if scheme.act_dynamic else ""),
                    weight_error=w_err,
                    act_scale=None if act_scale is None else [float(v) for v in act_scale],
                    outlier_ratio=stats.outlier_ratio() if stats.absmax_channel is not None else None,
                    outlier_ratio_before=getattr(module, "outlier_ratio_before", None),
                    online_hadamard=module.online_hadamard,
                    rms_split=module.rms_split,
                    observer=self.recipe.observer,
                )
            )
