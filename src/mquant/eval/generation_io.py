"""`mquant generate`: run-time checks, streaming, and the one call the command makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TextStreamer

from mquant.errors import InputError
from mquant.eval.cpu_runtimes import load_for_runtime
from mquant.eval.generation import generate_texts
from mquant.io.loading import LoadedModel


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None)


def check_prompt_fits(loaded: LoadedModel, prompt: str, max_new_tokens: int) -> None:
    """A prompt longer than the context fails before any work, with the numbers."""
    tokenizer = getattr(loaded.processor, "tokenizer", None)
    limit = _context_length(loaded.model)
    if tokenizer is None or limit is None:
        return
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    if n + max_new_tokens > limit:
        raise InputError(f"prompt is {n} tokens; with {max_new_tokens} new tokens it exceeds the model's context of {limit}; shorten it")


def text_streamer(processor: Any):
    tokenizer = getattr(processor, "tokenizer", processor)
    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_answer(model_source: str | None, image: str | Path, prompt: str, max_new_tokens: int = 32,
                    stream: bool = False, runtime: str = "torch") -> dict[str, Any]:
    """Answer PROMPT about IMAGE with a float or quantized model (quantized: on the integer kernels),
    or an ONNX export in `runtime`. With `stream`, tokens are printed to stdout as they are generated."""
    loaded = load_for_runtime(model_source, runtime)
    check_prompt_fits(loaded, prompt, max_new_tokens)
    streamer = text_streamer(loaded.processor) if stream else None
    answer = generate_texts(loaded.model, loaded.processor, [str(image)], [prompt], max_new_tokens=max_new_tokens,
                            batch_size=1, streamer=streamer)[0]
    return {"answer": answer, "model": loaded.source, "quantized": loaded.quantized, "runtime": runtime}
