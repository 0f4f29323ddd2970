"""`mquant eval`: easy-VQA accuracy, fidelity against the float model, language perplexity, and
the standard VLM benchmarks on local data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mquant.demo.easyvqa import load_split
from mquant.errors import InputError
from mquant.eval import benchmarks_local as bl
from mquant.eval.cpu_runtimes import load_for_runtime
from mquant.eval.easyvqa import easyvqa_accuracy_of
from mquant.eval.easyvqa_ood import DEFAULT_PER_SUBSET, OODSuite, with_all_row
from mquant.eval.fidelity import next_token_fidelity
from mquant.eval.generation import generate_texts
from mquant.eval.perplexity import perplexity
from mquant.eval.shared_prefix import answer_by_image
from mquant.io.loading import LoadedModel, load_any, load_float_model
from mquant.kernels.attach import attach_kernels

TASKS = ("easy-vqa", "easy-vqa-ood", "fidelity", "perplexity", "textvqa", "docvqa", "ocrbench", "mme")
FIDELITY_DEFAULT_N = 256


def _calibration_note(loaded: LoadedModel) -> Any:
    if not loaded.quantized or not (Path(loaded.source) / "mquant_config.json").is_file():
        return None
    meta = json.loads((Path(loaded.source) / "mquant_config.json").read_text())
    return meta.get("calibration")


def _easyvqa_answers(loaded: LoadedModel, items, batch_size: int) -> tuple[list[str], torch.Tensor | None]:
    """Our DefaultProcessor gets the shared-prefix path (same greedy answers, ~4x faster);
    other processors go through `generate` one prompt per row."""
    paths, questions = [i.image_path for i in items], [i.question for i in items]
    if hasattr(loaded.processor, "encode_prompt"):
        return answer_by_image(loaded.model, loaded.processor, paths, questions, max_new_tokens=3,
                               images_per_batch=max(1, batch_size // 4))
    return generate_texts(loaded.model, loaded.processor, paths, questions, max_new_tokens=3, batch_size=batch_size), None


def easyvqa_accuracy(loaded: LoadedModel, limit: int | None, batch_size: int, progress=None) -> dict[str, Any]:
    items = load_split("test")[: limit or None]
    replies, _ = _easyvqa_answers(loaded, items, batch_size)
    return {"n": len(items), "accuracy": easyvqa_accuracy_of(replies, items), "split": "test"}


def fidelity(loaded: LoadedModel, reference: str | None, limit: int | None, batch_size: int) -> dict[str, Any]:
    """KL(P_float || P_quant) and top-1 agreement of the next-token distribution at the answer
    position of held-out easy-VQA *test* prompts (calibration used the train split)."""
    ref = load_float_model(reference)
    items = load_split("test")[: limit or FIDELITY_DEFAULT_N]
    _, ref_logits = _easyvqa_answers(ref, items, batch_size)
    _, test_logits = _easyvqa_answers(loaded, items, batch_size)
    if ref_logits is None or test_logits is None:
        raise InputError("fidelity needs the default model's processor (easy-VQA prompts); use --task easy-vqa for other models")
    result = next_token_fidelity(ref_logits, test_logits)
    return {"n": len(items), "kl": result["kl"], "top1_agreement": result["top1_agreement"], "positions": result["positions"]}


def easyvqa_ood(loaded: LoadedModel, reference: str | None, limit: int | None, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Accuracy per robustness subset (`--limit` questions each); a quantized model (or one given a
    `--reference`) also gets KL against the float model on the same questions."""
    if not hasattr(loaded.processor, "encode_prompt"):
        raise InputError("easy-vqa-ood needs the default model's processor (easy-VQA prompts); use the default model or one quantized from it")
    suite = OODSuite(limit or DEFAULT_PER_SUBSET, seed, batch_size)
    try:
        if loaded.quantized or reference is not None:
            suite.set_reference(load_float_model(reference).model, loaded.processor)
        subsets = with_all_row(suite.score(loaded.model, loaded.processor))
    finally:
        suite.close()
    return {"n_per_subset": limit or DEFAULT_PER_SUBSET, "seed": seed, "split": "test (re-worded / re-rendered at run time)", "subsets": subsets}


def language_perplexity(loaded: LoadedModel, limit: int | None) -> dict[str, Any]:
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    windows = limit or 8
    ppl = perplexity(lambda input_ids: loaded.model(input_ids=input_ids), tokenizer, seq_len=256, max_windows=windows)
    return {"n": windows, "perplexity": ppl, "text": "pydoc_data.topics (ships with CPython)"}


def local_benchmark(loaded: LoadedModel, task: str, data: Path | None, limit: int | None, batch_size: int) -> dict[str, Any]:
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
             reference: str | None = None, batch_size: int = 32, progress=None, kernels: bool = True,
             runtime: str = "torch", threads: int | None = None) -> dict[str, Any]:
    if task not in TASKS:
        raise InputError(f"unknown task '{task}'; use one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if runtime != "torch":  # an ONNX export in ONNX Runtime / OpenVINO
        loaded = load_for_runtime(model_source, runtime, threads)
    else:
        loaded = load_any(model_source)
        if loaded.quantized and kernels:  # score the model as it is served: on the integer kernels
            attach_kernels(loaded.model)
    start = time.perf_counter()
    if task == "easy-vqa":
        result = easyvqa_accuracy(loaded, limit, batch_size, progress)
    elif task == "easy-vqa-ood":
        result = easyvqa_ood(loaded, reference, limit, batch_size)
    elif task == "fidelity":
        result = fidelity(loaded, reference, limit, batch_size)
    elif task == "perplexity":
        result = language_perplexity(loaded, limit)
    else:
        result = local_benchmark(loaded, task, data, limit, batch_size)
    return {"task": task, "model": loaded.source, "runtime": runtime, "quantized": loaded.quantized,
            "kernels": loaded.quantized and (kernels or runtime != "torch"),
            "calibration": _calibration_note(loaded), **result, "seconds": time.perf_counter() - start}
