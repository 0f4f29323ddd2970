"""The processor saved next to a quantized model: our default model's (its tokenizer) or any
`save_pretrained`-able transformers processor; `mquant_config.json` records which."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mquant.demo.processor import DefaultProcessor


def save_processor(processor: Any, out_dir: Path) -> dict[str, Any]:
    """Save the processor next to the weights; returns what `load_saved_processor` needs."""
    if isinstance(processor, DefaultProcessor):
        processor.tokenizer.save_pretrained(out_dir)
        return {"processor": "default"}
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(out_dir)
        return {"processor": "auto"}
    return {"processor": None}


def load_saved_processor(model_dir: str | Path) -> Any:
    meta = json.loads((Path(model_dir) / "mquant_config.json").read_text())
    kind = meta.get("processor")
    if kind == "default":
        # lazy: transformers' auto classes take seconds to import
        from transformers import AutoTokenizer

        return DefaultProcessor(AutoTokenizer.from_pretrained(str(model_dir)))
    if kind == "auto":
        # lazy: transformers' auto classes take seconds to import
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(model_dir))
    return None
