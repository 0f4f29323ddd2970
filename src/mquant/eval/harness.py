"""`mquant eval`: easy-VQA accuracy, fidelity against the float model, language perplexity, and
the standard VLM benchmarks on local data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..models.loading import LoadedModel, load_any, load_float_model

TASKS = ("easy-vqa", "fidelity", "perplexity", "textvqa", "docvqa", "ocrbench", "mme")
FIDELITY_DEFAULT_N = 256


def _calibration_note(loaded: LoadedModel) -> Any:
    if not loaded.quantized:
        return None
    import json

    meta = json.loads((Path(loaded.source) / "mquant_config.json").read_text())
    return meta.get("calibration")


def easyvqa_accuracy(loaded: LoadedModel, limit: int | None, batch_size: int, progress=None) -> dict[str, Any]:
    from ..default_model.easyvqa import first_word, load_split
    from .generation import generate_texts

    items = load_split("test")[: limit or None]
    replies = generate_texts(loaded.model, loaded.processor, [i.image_path for i in items], [i.question for i in items],
                             max_new_tokens=3, batch_size=batch_size)
    hits = sum(first_word(r) == i.answer.lower() for r, i in zip(replies, items))
    return {"n": len(items), "accuracy": hits / len(items), "split": "test"}


@torch.no_grad()
def answer_logits(loaded: LoadedModel, items, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced logits over the text after the image (question + gold answer), per batch."""
    from ..calib.data import open_image
    from .generation import encode_batch

    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = encode_batch(loaded.processor, [open_image(i.image_path) for i in chunk], [i.question for i in chunk])
        logits = loaded.model(**batch).logits.float()
        out.append((logits, batch["attention_mask"].bool()))
    return out


def fidelity(loaded: LoadedModel, reference: str | None, limit: int | None, batch_size: int) -> dict[str, Any]:
    """KL(P_float || P_quant) and top-1 agreement of next-token distributions on held-out
    easy-VQA *test* prompts (calibration used the train split)."""
    from ..default_model.easyvqa import load_split
    from .fidelity import next_token_fidelity

    ref = load_float_model(reference)
    items = load_split("test")[: limit or FIDELITY_DEFAULT_N]
    totals = {"kl": 0.0, "top1_agreement": 0.0, "positions": 0}
    for (ref_logits, mask), (test_logits, _) in zip(answer_logits(ref, items, batch_size), answer_logits(loaded, items, batch_size)):
        result = next_token_fidelity(ref_logits, test_logits, mask)
        n = result["positions"]
        totals["kl"] += result["kl"] * n
        totals["top1_agreement"] += result["top1_agreement"] * n
        totals["positions"] += n
    n = max(totals["positions"], 1)
    return {"n": len(items), "kl": totals["kl"] / n, "top1_agreement": totals["top1_agreement"] / n, "positions": totals["positions"]}


def language_perplexity(loaded: LoadedModel, limit: int | None) -> dict[str, Any]:
    from .perplexity import perplexity

    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    windows = limit or 8
    ppl = perplexity(lambda input_ids: loaded.model(input_ids=input_ids), tokenizer, seq_len=256, max_windows=windows)
    return {"n": windows, "perplexity": ppl, "text": "pydoc_data.topics (ships with CPython)"}


def local_benchmark(loaded: LoadedModel, task: str, data: Path | None, limit: int | None, batch_size: int) -> dict[str, Any]:
    from . import benchmarks_local as bl
    from .generation import generate_texts

    if data is None:
        raise InputError(f"task {task} needs local data: pass --data PATH (the benchmark's JSON/TSV or folder)")
    loaders = {"textvqa": bl.load_textvqa, "docvqa": bl.load_docvqa, "ocrbench": bl.load_ocrbench,
               "mme": bl.load_mme_tsv if Path(data).suffix == ".tsv" else bl.load_mme_folder}
    items = loaders[task](data)[: limit or None]
    replies = generate_texts(loaded.model, loaded.processor, [i.image_path for i in items], [i.question for i in items],
                             max_new_tokens=32, batch_size=batch_size)
    scored = bl.score_predictions(task, items, replies)
    scored.pop("per_item", None)
    return scored


def run_eval(model_source: str | None, task: str, *, limit: int | None = None, data: Path | None = None,
             reference: str | None = None, batch_size: int = 32, progress=None) -> dict[str, Any]:
    if task not in TASKS:
        raise InputError(f"unknown task '{task}'; use one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    loaded = load_any(model_source)
    start = time.perf_counter()
    if task == "easy-vqa":
        result = easyvqa_accuracy(loaded, limit, batch_size, progress)
    elif task == "fidelity":
        result = fidelity(loaded, reference, limit, batch_size)
    elif task == "perplexity":
        result = language_perplexity(loaded, limit)
    else:
        result = local_benchmark(loaded, task, data, limit, batch_size)
    return {"task": task, "model": loaded.source, "quantized": loaded.quantized,
            "calibration": _calibration_note(loaded), **result, "seconds": time.perf_counter() - start}
