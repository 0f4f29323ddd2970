"""Writing quantized models: mquant's own format (native), compressed-tensors (vLLM) and ONNX QDQ
(ONNX Runtime, OpenVINO)."""

from __future__ import annotations

from pathlib import Path

from mquant.errors import ConfigError
from mquant.io.compressed import export_compressed_tensors
from mquant.io.loader import load_quantized
from mquant.io.native import read_meta, save_quantized
from mquant.io.onnx_export import export_onnx
from mquant.io.processors import load_saved_processor

FORMATS = ("compressed-tensors", "mquant", "onnx")


def export_model(model_dir: str | Path, format: str, out: str | Path, image_grids: list | None = None) -> Path:
    """Re-write a directory saved by `mquant quantize` in `format`, atomically, to `out`.
    `image_grids`: the (t, h, w) patch grids of a Qwen2-VL ONNX export."""
    if format == "compressed-tensors":
        return export_compressed_tensors(model_dir, out)
    if format == "onnx":
        return export_onnx(model_dir, out, image_grids=image_grids)
    if image_grids:
        raise ConfigError("--image-grid is for --format onnx (Qwen2-VL)")
    if format == "mquant":
        model = load_quantized(model_dir)
        extra = {"calibration": read_meta(model_dir).get("calibration")}
        return save_quantized(model, out, processor=load_saved_processor(model_dir), extra=extra)
    raise ConfigError(f"unknown export format '{format}'; use one of {', '.join(FORMATS)}")

