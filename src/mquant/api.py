"""The verbs: `quantize(model, recipe, calib=...)`, `save_quantized`, `load_quantized`, and
`quantize_and_save` (load → quantize → save, as the CLI runs it)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mquant.calib.capture import capture_inputs
from mquant.calib.checkpoint import open_checkpoint
from mquant.calib.data import build_calibration_inputs, build_text_calibration_inputs, split_validation
from mquant.calib.offload import OffloadSession
from mquant.calib.report import QuantReport
from mquant.calib.sequential import SequentialCalibrator
from mquant.calib.stats import AUTO_OBSERVER
from mquant.config import CalibConfig, Recipe, recipe_for
from mquant.core.modality import row_classes
from mquant.core.state import QuantState
from mquant.errors import CalibrationError, ConfigError
from mquant.io.loader import load_quantized as _load_quantized
from mquant.io.loading import load_float_model
from mquant.io.native import save_quantized as _save_quantized
from mquant.models.base import ModelAdapter
from mquant.models.registry import get_adapter
from mquant.steps import build_steps
from mquant.steps.runner import install_steps, prepare_model


def quantize(
    model: nn.Module,
    recipe: Recipe | None = None,
    calib: CalibConfig | Sequence[dict] | None = None,
    *,
    processor: Any = None,
    progress: Callable[[str, int], None] | None = None,
    adapter: ModelAdapter | None = None,
    checkpoint_dir: str | Path | None = None,
    offload: OffloadSession | None = None,
    validation: Sequence[dict] | None = None,
) -> QuantReport:
    """Quantize every linear layer of a VLM (vision tower, projector, language model), or of a
    text-only causal LM (the language half; MSQ/AIFS, which act on visual tokens, are skipped), in place.

    `calib` is a CalibConfig (samples are built with `processor`) or a list of ready model-input
    dicts (one sample each). Returns the report; the model afterwards runs quantized.
    With `checkpoint_dir`, each finished block is saved there; rerunning with the same directory,
    model, recipe and samples restores finished blocks instead of recalibrating them.
    `offload` (what `quantize_offloaded` passes) streams a disk-offloaded model: the steps' block
    hooks and the calibration load one block at a time (calib/offload.py).
    `validation`: held-out samples (a CalibConfig's `n_validation` makes them), never observed; they
    give report.json's range overflow per layer and observer "auto" its choice.
    """
    recipe = recipe or recipe_for("rtn", "w8a8")
    adapter = adapter or get_adapter(model)
    spec = adapter.validate(model)
    recipe, skipped = _fit_recipe(recipe, spec)
    held_out = isinstance(calib, CalibConfig) and calib.n_validation > 0 and not spec.text_only
    if recipe.observer == AUTO_OBSERVER and not (validation or held_out):
        raise ConfigError("observer 'auto' chooses per layer on a validation split; pass --n-validation N (CalibConfig) or validation=")
    samples = _calibration_samples(calib, processor, model, spec.text_only)
    if held_out and validation is None:
        samples, validation = split_validation(samples, calib)
    validation = list(validation or [])
    masks = val_masks = None  # a text-only model has no visual positions: every row is text
    if not spec.text_only:
        val_masks = [adapter.visual_token_mask(model, s["input_ids"]) for s in validation]
        masks = [adapter.visual_token_mask(model, s["input_ids"]) for s in samples]
        if not any(bool(m.any()) for m in masks):
            raise CalibrationError("calibration data has no image: a VLM needs image+text samples to calibrate its vision tower; add images")
        if getattr(recipe.step("msq"), "first_token", False):  # each sample is one prompt from its start
            masks = [row_classes(m, s.get("attention_mask")) for m, s in zip(masks, samples)]
            val_masks = [row_classes(m, s.get("attention_mask")) for m, s in zip(val_masks, validation)]
    checkpoint = open_checkpoint(checkpoint_dir, recipe, samples, model)
    steps = build_steps(recipe)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        state = QuantState.ensure(model)
        if offload is not None:
            offload.start(adapter, spec, steps)
        spec, transform_info = prepare_model(model, adapter, spec, steps, state, blocks=offload is None)
        before_block = None if offload is None else offload.before_block
        calibrator = SequentialCalibrator(recipe, steps, state.ctx, progress, checkpoint=checkpoint, before_block=before_block)
        _calibrate(model, spec, calibrator, (samples, masks), (validation, val_masks), recipe, progress)
        if offload is not None:
            spec = adapter.validate(model)  # the blocks were edited while they were calibrated
        state.recipe = recipe
        state.track_modality(model, spec.image_token_ids)
        transform_info.update(install_steps(model, adapter, spec, steps))
    transform_info.update(skipped)
    return QuantReport(
        model=type(model).__name__,
        recipe=recipe.to_dict(),
        calibration=_describe_calibration(calib, len(samples)),
        layers=calibrator.records,
        seconds=time.perf_counter() - start,
        peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        transforms=transform_info,
    )


# MSQ's [text, visual] scale pair and AIFS's visual-first reordering act on visual tokens only: on a
# text-only model both are identities, so they are left out of the recipe and the report says so.
IMAGE_ONLY_STEPS = ("msq", "aifs")


def _fit_recipe(recipe: Recipe, spec) -> tuple[Recipe, dict]:
    dropped = [name for name in IMAGE_ONLY_STEPS if spec.text_only and recipe.has(name)]
    for name in dropped:
        recipe = recipe.without(name)
    note = {"skipped_steps": {name: "no visual tokens in a text-only model: the step would be the identity" for name in dropped}}
    return recipe, note if dropped else {}


def _calibrate(model, spec, calibrator: SequentialCalibrator, calib: tuple, validation: tuple, recipe: Recipe, progress) -> None:
    """Vision blocks, then the projector, then language blocks: each stage is calibrated on the
    outputs of the already-quantized stages before it (a text-only model: language blocks only).
    `calib` and `validation` are (samples, visual masks); validation samples only run."""
    (samples, masks), (val_samples, val_masks) = calib, validation
    first_language = spec.language.blocks[0].module

    def val(target):  # the validation split's inputs of `target`, or None without one
        return (capture_inputs(model, target, val_samples), None) if val_samples else None

    if not spec.text_only:
        inputs = capture_inputs(model, spec.vision.blocks[0].module, samples)
        calibrator.run_blocks(list(spec.vision.blocks), inputs, recipe.vision, "vision", validation=val(spec.vision.blocks[0].module))
        # The projector runs inside the model's forward (for DeepStack, in several places): its runner
        # is a forward that stops at the first language block, so vision and projectors run, the LM not.
        calibrator.calibrate("projector-0000", spec.projector, lambda: capture_inputs(model, first_language, samples),
                             recipe.vision, "projector", lambda: capture_inputs(model, first_language, val_samples) if val_samples else None)
        if progress is not None:
            progress("projector", 1)
    inputs = capture_inputs(model, first_language, samples)
    language_val = (capture_inputs(model, first_language, val_samples), val_masks) if val_samples else None
    calibrator.run_blocks(list(spec.language.blocks), inputs, recipe.language, "language", masks, language_val)


def _calibration_samples(calib: CalibConfig | Sequence[dict] | None, processor: Any, model: nn.Module, text_only: bool) -> list[dict]:
    if calib is None:
        calib = CalibConfig()
    if not isinstance(calib, CalibConfig):
        samples = list(calib)
    elif text_only:
        samples = build_text_calibration_inputs(calib, processor)
    else:
        samples = build_calibration_inputs(calib, processor, model)
    if not samples:
        what = "text samples (--calib DIR of .txt|FILE.jsonl of {\"text\"})" if text_only else "image+prompt samples (--calib DIR|FILE.jsonl)"
        raise CalibrationError(f"the calibration set is empty; pass {what}, --n-calib N >= 1")
    return samples


def _describe_calibration(calib: Any, n: int) -> dict[str, Any]:
    if isinstance(calib, CalibConfig):
        return {"source": calib.source, "n_samples": n, "seed": calib.seed, "prompts": calib.prompts,
                "text_fraction": calib.text_fraction, "decode_tokens": calib.decode_tokens, "n_validation": calib.n_validation}
    return {"source": "user-provided inputs", "n_samples": n}


def quantize_offloaded(model: nn.Module, recipe: Recipe, calib: CalibConfig | Sequence[dict] | None, **kwargs: Any):
    """`quantize` on a model opened with `calib.offload.load_offloaded`: only the block being
    calibrated is materialized. Returns (report, session); call `materialize(model)` before saving."""
    session = OffloadSession(model)
    report = quantize(model, recipe, calib, offload=session, **kwargs)
    return report, session


def save_quantized(model: nn.Module, out_dir, processor: Any = None, report: QuantReport | None = None):
    """Write a quantized model (our format) and, if given, its report, atomically."""
    extra = {"calibration": report.calibration} if report is not None else {}
    return _save_quantized(model, out_dir, processor=processor, extra=extra, report=report)


def load_quantized(model_dir) -> nn.Module:
    """Rebuild a model saved by `save_quantized`; its outputs are bit-identical to the saved one.
    Any problem with the directory raises CheckpointError naming the file (see io/loader.py)."""
    return _load_quantized(model_dir)


def quantize_and_save(model_source: str | None, recipe: Recipe, calib: CalibConfig, out: Path, progress=None) -> QuantReport:
    """Everything is validated before the output directory is touched; it is written atomically."""
    loaded = load_float_model(model_source)
    if progress is not None and hasattr(progress, "set_total"):
        spec = get_adapter(loaded.model).validate(loaded.model)
        progress.set_total(sum(len(t.blocks) for t in spec.towers()) + (0 if spec.text_only else 1))
    report = quantize(loaded.model, recipe, calib, processor=loaded.processor, progress=progress)
    if progress is not None and hasattr(progress, "close"):
        progress.close()
    report.model = loaded.source
    save_quantized(loaded.model, out, processor=loaded.processor, report=report)
    return report
