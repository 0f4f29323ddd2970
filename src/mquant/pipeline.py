"""Load → quantize → save, as the CLI and scripts run it."""

from __future__ import annotations

from pathlib import Path

from .api import quantize, save_quantized
from .config import CalibConfig, Recipe
from .models.loading import load_float_model
from .report import QuantReport


def quantize_and_save(model_source: str | None, recipe: Recipe, calib: CalibConfig, out: Path, progress=None) -> QuantReport:
    """Everything is validated before the output directory is touched; it is written atomically."""
    loaded = load_float_model(model_source)
    if progress is not None and hasattr(progress, "set_total"):
        from .models.registry import get_adapter

        spec = get_adapter(loaded.model).validate(loaded.model)
        progress.set_total(len(spec.vision.blocks) + 1 + len(spec.language.blocks))
    report = quantize(loaded.model, recipe, calib, processor=loaded.processor, progress=progress)
    if progress is not None and hasattr(progress, "close"):
        progress.close()
    report.model = loaded.source
    save_quantized(loaded.model, out, processor=loaded.processor, report=report)
    return report
