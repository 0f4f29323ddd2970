"""The verbs: `quantize(model, recipe, calib=...)`, `save_quantized`, `load_quantized`."""

from __future__ import annotations

import functools
import resource
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .calib.capture import capture_inputs
from .calib.checkpoint import open_checkpoint
from .calib.sequential import SequentialCalibrator
from .config import CalibConfig, Recipe, recipe_for
from .errors import CalibrationError
from .models.base import ModelAdapter
from .models.registry import get_adapter
from .quant.modality import ModalityContext, attach_modality_hook
from .quant.swap import wrap_linears
from .report import QuantReport
from .transforms.pipeline import steps_for


def quantize(
    model: nn.Module,
    recipe: Recipe | None = None,
    calib: CalibConfig | Sequence[dict] | None = None,
    *,
    processor: Any = None,
    progress: Callable[[str, int], None] | None = None,
    adapter: ModelAdapter | None = None,
    checkpoint_dir: str | Path | None = None,
    before_block: Callable[[Any], None] | None = None,
) -> QuantReport:
    """Quantize every linear layer of a VLM (vision tower, projector, language model) in place.

    `calib` is a CalibConfig (samples are built with `processor`) or a list of ready model-input
    dicts (one sample each). Returns the report; the model afterwards runs quantized.
    With `checkpoint_dir`, each finished block is saved there; rerunning with the same directory,
    model, recipe and samples restores finished blocks instead of recalibrating them.
    `before_block(block_spec)` runs before each block is calibrated (offloading: calib/offload.py).
    """
    recipe = recipe or recipe_for("rtn", "w8a8")
    adapter = adapter or get_adapter(model)
    spec = adapter.validate(model)
    samples = _calibration_samples(calib, processor, model)
    masks = [adapter.visual_token_mask(model, s["input_ids"]) for s in samples]
    if not any(bool(m.any()) for m in masks):
        raise CalibrationError("calibration data has no image: a VLM needs image+text samples to calibrate its vision tower; add images")
    checkpoint = open_checkpoint(checkpoint_dir, recipe, samples, model)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        spec, ctx, transform_info = _prepare(model, adapter, spec, recipe)
        hooks = [functools.partial(step.run, recipe=recipe) for step in steps_for(recipe, "pre_quant")]
        calibrator = SequentialCalibrator(recipe, ctx, progress, hooks, checkpoint=checkpoint, before_block=before_block)
        _calibrate(model, spec, calibrator, samples, masks, recipe, progress)
        model._mquant_modality_hook = attach_modality_hook(model, ctx, spec.image_token_ids)
        model._mquant_ctx = ctx
        for step in steps_for(recipe, "post"):
            transform_info[step.name] = step.run(model, adapter, spec, recipe)
    model.mquant_recipe = recipe
    return QuantReport(
        model=type(model).__name__,
        recipe=recipe.to_dict(),
        calibration=_describe_calibration(calib, len(samples)),
        layers=calibrator.records,
        seconds=time.perf_counter() - start,
        peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        transforms=transform_info,
    )


def _prepare(model: nn.Module, adapter: ModelAdapter, spec, recipe: Recipe):
    """Float-equivalent transforms on nn.Linear weights, then the swap to QuantLinear (float state)
    and the online transforms that configure it. Returns the re-validated spec."""
    info: dict[str, Any] = {}
    for step in steps_for(recipe, "float"):
        info[step.name] = step.run(model, adapter, spec, recipe)
        spec = adapter.validate(model)
    ctx = ModalityContext()
    wrap_linears(model, spec, ctx)
    spec = adapter.validate(model)
    for step in steps_for(recipe, "online"):
        info[step.name] = step.run(model, adapter, spec, recipe)
    return spec, ctx, info


def _calibrate(model, spec, calibrator: SequentialCalibrator, samples, masks, recipe: Recipe, progress) -> None:
    """Vision blocks, then the projector, then language blocks: each stage is calibrated on the
    outputs of the already-quantized stages before it."""
    inputs = capture_inputs(model, spec.vision.blocks[0].module, samples)
    calibrator.run_blocks(list(spec.vision.blocks), inputs, recipe.vision, "vision")
    # The projector runs inside the model's forward (for DeepStack, in several places): its runner
    # is a forward that stops at the first language block, so vision and projectors run, the LM not.
    first_language = spec.language.blocks[0].module
    calibrator.calibrate("projector-0000", spec.projector, lambda: capture_inputs(model, first_language, samples),
                         recipe.vision, "projector")
    if progress is not None:
        progress("projector", 1)
    inputs = capture_inputs(model, first_language, samples)
    calibrator.run_blocks(list(spec.language.blocks), inputs, recipe.language, "language", masks)


def _calibration_samples(calib: CalibConfig | Sequence[dict] | None, processor: Any, model: nn.Module) -> list[dict]:
    if calib is None:
        calib = CalibConfig()
    if isinstance(calib, CalibConfig):
        from .calib.data import build_calibration_inputs

        samples = build_calibration_inputs(calib, processor, model)
    else:
        samples = list(calib)
    if not samples:
        raise CalibrationError("the calibration set is empty; pass image+prompt samples (--calib DIR|FILE.jsonl, --n-calib N >= 1)")
    return samples


def _describe_calibration(calib: Any, n: int) -> dict[str, Any]:
    if isinstance(calib, CalibConfig):
        return {"source": calib.source, "n_samples": n, "seed": calib.seed}
    return {"source": "user-provided inputs", "n_samples": n}


def save_quantized(model: nn.Module, out_dir, processor: Any = None, report: QuantReport | None = None):
    """Write a quantized model (our format) and, if given, its report, atomically."""
    from .export.native import save_quantized as _save

    extra = {"calibration": report.calibration} if report is not None else {}
    return _save(model, out_dir, processor=processor, extra=extra, report=report)


def load_quantized(model_dir) -> nn.Module:
    """Rebuild a model saved by `save_quantized`; its outputs are bit-identical to the saved one.
    Any problem with the directory raises CheckpointError naming the file (see export/loader.py)."""
    from .export.loader import load_quantized as _load

    return _load(model_dir)
