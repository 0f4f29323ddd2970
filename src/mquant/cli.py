"""`mquant` command line: thin over `mquant.api` and `mquant.eval`.

Each command parses its options, builds the config, makes ONE api/eval call and prints the result.
Progress goes to stderr; with `--json` the last thing on stdout is one JSON object. Problems a user
can cause end with `error: <one line>` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console

from mquant.api import quantize_and_save
from mquant.config import CalibConfig, recipe_for
from mquant.errors import ConfigError, InputError, MQuantError
from mquant.eval.ablation import markdown_table, recipes_for_rows, run_variants
from mquant.eval.bench import VARIANTS, bench_model, bench_runtime, bench_text
from mquant.eval.bench_shaped import SHAPED_MODELS, SHAPED_VARIANTS, bench_shaped, shaped_text
from mquant.eval.generation_io import generate_answer
from mquant.eval.harness import run_eval
from mquant.eval.inspect import model_info
from mquant.io.export import export_model
from mquant.progress import BlockProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fully static W8A8/W4A8 quantization of whole vision-language models (MQuant).")
err = Console(stderr=True)

RUNTIME_OPT = typer.Option("torch", help="torch (our runtime) | onnxruntime | openvino (MODEL is then an ONNX export directory)")
MODEL_ARG = typer.Argument(None, help="Hub id, local model directory, or a directory written by `mquant quantize`; default: the offline default model")


def emit(payload: dict[str, Any], as_json: bool, human: str | None = None) -> None:
    """`--json`: one JSON line. Otherwise `human` through rich on a terminal; to a pipe or a file as
    plain text, never wrapped (rich wraps at the terminal width even when stdout is not one)."""
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    elif human is not None and sys.stdout.isatty():
        Console().print(human)
    elif human is not None:
        sys.stdout.write(human + "\n")


def _log(line: str) -> None:
    err.print(line, highlight=False, soft_wrap=True)


def _progress() -> BlockProgress:
    return BlockProgress(err)


@app.command()
def quantize(
    model: Optional[str] = MODEL_ARG,
    scheme: str = typer.Option("w4a8", help="Language-model scheme: w8a8, w4a8, w4a16, w8a16"),
    vision_scheme: Optional[str] = typer.Option(None, help="Vision tower + projector scheme (default: same as --scheme)"),
    method: str = typer.Option("mquant", help="rtn | gptq | smoothquant | quarot | mquant"),
    act: Optional[str] = typer.Option(None, help="static | dynamic (default: static; dynamic for quarot)"),
    group_size: Optional[int] = typer.Option(None, help="Weight group size (default: per output channel)"),
    observer: Optional[str] = typer.Option(None, help="Activation observer: minmax | percentile | mse | auto (per layer, by validation error; needs --n-validation); default mse for mquant static, else minmax"),
    calib: str = typer.Option("default", help="'default' (easy-VQA train), a folder of images, a .jsonl of image+prompt, or a datasets name"),
    n_calib: int = typer.Option(32, help="Number of calibration samples"),
    seed: int = typer.Option(0, help="Calibration sample seed"),
    calib_prompts: str = typer.Option("train", help="train (the source's prompts) | diverse (re-worded, free-form instructions mixed in)"),
    text_fraction: float = typer.Option(0.0, help="Share of calibration samples that are text-only chat turns"),
    decode_tokens: int = typer.Option(0, help="Greedy tokens of the float model appended to each sample (decode steps calibrated)"),
    n_validation: int = typer.Option(0, help="Held-out calibration samples: range overflow per layer in report.json, observer auto"),
    first_token_scale: Optional[bool] = typer.Option(None, "--first-token-scale/--no-first-token-scale", help="MSQ: a third static scale for each prompt's first token (the attention sink); default on for mquant static"),
    out: Path = typer.Option(Path("mquant-out"), help="Output directory (written atomically)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout"),
) -> None:
    """Quantize MODEL and write it (safetensors) with report.json, report.md and report.png."""
    recipe = recipe_for(method, scheme, act, vision_scheme, group_size, observer, first_token_scale)
    calib_cfg = CalibConfig(source=calib, n_samples=n_calib, seed=seed, prompts=calib_prompts, text_fraction=text_fraction,
                            decode_tokens=decode_tokens, n_validation=n_validation)
    report = quantize_and_save(model, recipe, calib_cfg, out, progress=_progress())
    payload = {"out": str(out), "method": method, "scheme": recipe.language.name, "vision_scheme": recipe.vision.name,
               "seconds": report.seconds, "peak_memory_bytes": report.peak_memory_bytes, "summary": report.summary()}
    emit(payload, as_json, f"wrote {out} ({report.seconds:.1f} s); report: {out}/report.md")


@app.command()
def info(model: Optional[str] = MODEL_ARG, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show the adapter's view of MODEL: towers, blocks, linear groups, norms, quantization state."""
    payload = model_info(model)
    emit(payload, as_json, json.dumps(payload, indent=2))


@app.command("eval")
def eval_cmd(
    model: Optional[str] = MODEL_ARG,
    task: str = typer.Option("easy-vqa", help="easy-vqa | easy-vqa-ood | fidelity | perplexity | textvqa | docvqa | ocrbench | mme"),
    limit: Optional[int] = typer.Option(None, help="Score only the first N questions (easy-vqa-ood: N per subset, default 200)"),
    data: Optional[Path] = typer.Option(None, help="Local benchmark data (file or folder) for textvqa/docvqa/ocrbench/mme"),
    reference: Optional[str] = typer.Option(None, help="Float reference for fidelity (default: the float default model)"),
    batch_size: int = typer.Option(32),
    reference_path: bool = typer.Option(False, "--reference-path", help="Run a quantized model on the fake-quant reference path instead of the integer kernels"),
    runtime: str = RUNTIME_OPT,
    threads: Optional[int] = typer.Option(None, help="Runtime threads (onnxruntime/openvino; default: the runtime's)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Evaluate a float or quantized model (quantized models run on the integer kernels)."""
    result = run_eval(model, task, limit=limit, data=data, reference=reference, batch_size=batch_size, progress=err,
                      kernels=not reference_path, runtime=runtime, threads=threads)
    emit(result, as_json, "\n".join(f"{k}: {v}" for k, v in result.items()))


@app.command()
def demo(
    limit: int = typer.Option(200, help="easy-VQA test questions to score"),
    n_calib: int = typer.Option(32, help="Calibration samples (easy-VQA train split)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The main job, offline: default model → W4A8 fully static MQuant → float vs quantized table."""
    results = run_variants([("mquant", recipe_for("mquant", "w4a8"))], limit=limit, n_calib=n_calib, log=_log)
    emit({"rows": [r.to_dict() for r in results], "limit": limit, "n_calib": n_calib}, as_json, markdown_table(results))


@app.command()
def ablate(
    model: Optional[str] = MODEL_ARG,
    scheme: str = typer.Option("w4a8", help="w8a8 | w4a8, or both comma-separated (one float reference for all)"),
    limit: Optional[int] = typer.Option(500, help="easy-VQA test questions to score (0: the full test split)"),
    n_calib: int = typer.Option(32),
    rows: str = typer.Option("ablation", help="ablation | baselines (RTN/GPTQ static+dynamic) | table (baselines + MQuant) | all "
                             "| calib (robust-calibration options) | ood (GPTQ dynamic, MQuant, MQuant robust)"),
    only: Optional[str] = typer.Option(None, help="Comma-separated row names to keep (e.g. mquant,mquant-auto)"),
    ood_limit: int = typer.Option(100, help="Questions per easy-vqa-ood subset (in-distribution, new wordings, new renderings, both); 0: skip"),
    save: Optional[Path] = typer.Option(None, help="Rewrite this JSON file after every variant"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Float, RTN, SmoothQuant, GPTQ, QuaRot, then MQuant one component at a time; each also on easy-vqa-ood."""
    recipes = [r for one in scheme.split(",") for r in recipes_for_rows(rows, one.strip(), n_calib)]
    if only:
        keep = {name.strip() for name in only.split(",")}
        recipes = [r for r in recipes if r[0] in keep]
        if not recipes:
            raise ConfigError(f"--only {only} names none of the --rows {rows} rows")
    results = run_variants(recipes, limit=limit or None, n_calib=n_calib, model_source=model, log=_log,
                           save_path=str(save) if save else None, ood_limit=ood_limit)
    emit({"rows": [r.to_dict() for r in results], "scheme": scheme, "limit": limit}, as_json, markdown_table(results))


@app.command()
def generate(
    model: Optional[str] = MODEL_ARG,
    image: Path = typer.Option(..., help="Image file"),
    prompt: str = typer.Option(..., help="Question or instruction"),
    max_new_tokens: int = typer.Option(32),
    runtime: str = RUNTIME_OPT,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Answer PROMPT about IMAGE with a float or quantized model, streaming tokens."""
    result = generate_answer(model, image, prompt, max_new_tokens, stream=not as_json, runtime=runtime)
    if as_json:
        emit(result, True)
    else:
        sys.stdout.write("\n")  # the answer itself was streamed


def _grid(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InputError(f"--image-grid '{text}': give TxHxW in patches, e.g. 1x28x28")
    return tuple(int(p) for p in parts)


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="A directory written by `mquant quantize`"),
    format: str = typer.Option("compressed-tensors", "--format", help="compressed-tensors | mquant | onnx (QDQ graphs for ONNX Runtime / OpenVINO)"),
    out: Path = typer.Option(..., help="Output directory (written atomically)"),
    image_grid: Optional[list[str]] = typer.Option(None, "--image-grid", help="onnx, Qwen2-VL: a patch grid TxHxW the vision graphs take (repeatable; e.g. 1x28x28 for 392x392 images at patch 14)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Export a quantized model for serving (compressed-tensors, the format vLLM loads) or re-save it."""
    written = export_model(model_dir, format, out, [_grid(g) for g in image_grid or []])
    emit({"out": str(written), "format": format}, as_json, f"wrote {written} ({format})")


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="Default: the offline default model"),
    visual_tokens: int = typer.Option(256, help="Visual tokens in the prompt (64 per default-model image)"),
    text_tokens: int = typer.Option(32, help="Approximate text tokens in the prompt"),
    new_tokens: int = typer.Option(16, help="Tokens generated for the decode measurement"),
    repeats: int = typer.Option(5, help="Timed repetitions (median reported)"),
    backend: Optional[str] = typer.Option(None, help="Kernel backend: native | onednn | int_mm | torch | triton (default: fastest for the device)"),
    device: str = typer.Option("cpu", help="cpu, or cuda[:N]: quantized layers then run on the Triton kernels"),
    variants: Optional[str] = typer.Option(None, help=f"Default: {','.join(VARIANTS)} ({','.join(SHAPED_VARIANTS)} for a shaped model)"),
    rounds: int = typer.Option(5, help="Shaped models: interleaved timed rounds (after one warm-up round)"),
    budget_s: Optional[float] = typer.Option(None, help="Shaped models: stop before a round that would pass this many seconds"),
    runtime: str = typer.Option("torch", help="torch | onnxruntime | openvino: MODEL is then an ONNX export, timed against PyTorch bf16"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Prefill latency, decode tokens/s, weight and peak memory: float vs dynamic vs static, one process.
    MODEL 'qwen2-vl-2b-shaped': a random-weight model of the real size, variants interleaved round-robin."""
    if runtime != "torch":
        if model is None:
            raise InputError(f"--runtime {runtime} times an ONNX export: pass its directory as MODEL")
        result = bench_runtime(model, runtime, visual_tokens, text_tokens, new_tokens, repeats, log=_log)
        emit(result, as_json, bench_text(result))
        return
    chosen = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    if model in SHAPED_MODELS:
        result = bench_shaped(model, chosen or SHAPED_VARIANTS, visual_tokens, text_tokens, new_tokens, rounds, backend, log=_log,
                              budget_s=budget_s)
        emit(result, as_json, shaped_text(result))
        return
    result = bench_model(model, chosen or VARIANTS, visual_tokens, text_tokens, new_tokens, repeats, backend, log=_log, device=device)
    emit(result, as_json, bench_text(result))


def main() -> None:
    try:
        app(standalone_mode=False)
    except MQuantError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except MemoryError:
        err.print("error: out of memory; use fewer calibration samples (--n-calib) or a machine with more memory", markup=False,
                  highlight=False, soft_wrap=True)
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
