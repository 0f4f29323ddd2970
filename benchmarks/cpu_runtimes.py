"""MQuant W8A8 in the CPU runtimes people deploy, side by side with those runtimes' own INT8.

Rows (same float default model, same 16 easy-VQA *train* calibration samples for every quantizer):
  bf16          PyTorch bf16 (the speed reference)
  mquant-torch  our runtime: MQuant W8A8 static on our integer kernels
  mquant-ort    the same model exported (`mquant export --format onnx`) in ONNX Runtime
  mquant-ov     the same export in OpenVINO
  nncf-ov       OpenVINO's own INT8: nncf.quantize of the float graphs (ModelType.TRANSFORMER, which
                turns SmoothQuant on) -- and nncf-nosq-ov, plain nncf.quantize
  ortq-ort      ONNX Runtime's own INT8: quantize_static (QDQ, per-channel s8 weights, u8 activations)
Accuracy: easy-VQA test questions through the one answering path (eval.shared_prefix), KL of the
first answer token against float32 PyTorch. Speed: prefill of the `mquant bench` prompt (256 visual
tokens) and decode tokens/s, each variant timed in interleaved rounds in this one process, medians,
wall and process CPU time, at each thread count; ratios vs bf16.

    python benchmarks/cpu_runtimes.py --mquant-dir DIR --work /tmp/cpu_rt --limit 1000 --threads 1,2 --rounds 5 \
        --out benchmarks/results/cpu_runtimes.json
DIR: `mquant quantize --method mquant --scheme w8a8 --act static --n-calib 16 --out DIR`.
`--mquant-w4a8-dir DIR4` (same command with `--scheme w4a8`) adds the MQuant W4A8 rows
(mquant-w4a8-torch / -ort / -ov): the export's 4-bit codes in int8 weights, static int8 activations.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mquant.calib.data import build_calibration_inputs
from mquant.config import CalibConfig
from mquant.demo.easyvqa import load_split
from mquant.eval.bench import default_model_bench_inputs
from mquant.eval.cpu_runtimes import RuntimeVLM
from mquant.eval.easyvqa import easyvqa_accuracy_of
from mquant.eval.fidelity import next_token_fidelity
from mquant.eval.shared_prefix import answer_by_image
from mquant.io.loader import load_quantized
from mquant.io.loading import load_float_model
from mquant.io.onnx_export import CONFIG_NAME, export_onnx
from mquant.kernels.attach import attach_kernels

GRAPHS = ("vision", "prefill", "decode")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- calibration feeds for the runtimes' own quantizers ------------------------------------------
def calibration_feeds(float_dir: Path, samples: list[dict], question_tokens: int = 8) -> dict[str, list[dict]]:
    """Per graph, the inputs the 16 calibration samples produce in the float graphs. Decode gets the
    two kinds of step the answering path runs: the prompt's last `question_tokens` tokens against the
    cache of the rest (the shared-prefix evaluation feeds each question so), and the first generated
    token. Calibrated on one-token steps only, NNCF's decode graph is wrong on multi-token steps
    (measured: logits off by 18-25 of 37 on a 5-token step, 1.0 on a 1-token step; 0% accuracy)."""
    runner = RuntimeVLM(float_dir, "onnxruntime")
    names = runner.config["graphs"]["decode"]["inputs"][3:]
    feeds = {g: [] for g in GRAPHS}
    fixed = runner.graphs["vision"].fixed_batch()  # a tower graph exported for a fixed image count
    for batch in samples:
        pixels = batch["pixel_values"].float().numpy()
        feeds["vision"] += [{"pixel_values": chunk} for chunk in _image_chunks(pixels, fixed)]
        feats = runner.image_features(batch["pixel_values"])
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        feeds["prefill"].append({"input_ids": ids, "attention_mask": mask, "image_features": feats})
        head = {**batch, "input_ids": batch["input_ids"][:, :-question_tokens], "attention_mask": batch["attention_mask"][:, :-question_tokens]}
        feeds["decode"].append(_decode_feed(runner(**head), ids[:, -question_tokens:], mask[:, -question_tokens:], names))
        out = runner(**batch)
        token = out.logits[:, -1].argmax(-1, keepdim=True).numpy()
        feeds["decode"].append(_decode_feed(out, token, np.ones_like(token), names))
    return feeds


def _decode_feed(out, ids: np.ndarray, mask: np.ndarray, names: list[str]) -> dict:
    step = {"input_ids": ids, "attention_mask": mask, "past_attention_mask": out.past_key_values.mask}
    step.update(zip(names, out.past_key_values.tensors))
    return step


def _image_chunks(pixels: np.ndarray, fixed: int | None) -> list[np.ndarray]:
    """The images in runs of the vision graph's fixed image count, the last padded by repeating
    its final image (repeats add no new values to the statistics)."""
    if fixed is None:
        return [pixels]
    chunks = [pixels[i:i + fixed] for i in range(0, len(pixels), fixed)]
    chunks[-1] = np.concatenate([chunks[-1], np.repeat(chunks[-1][-1:], fixed - len(chunks[-1]), axis=0)])
    return chunks


def _copy_export(src: Path, dst: Path, files: dict[str, str], quantizer: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.suffix not in (".onnx", ".xml", ".bin") and item.name != CONFIG_NAME:
            shutil.copy(item, dst / item.name)
    config = json.loads((src / CONFIG_NAME).read_text())
    for graph, name in files.items():
        config["graphs"][graph]["file"] = name
    config.update(scheme="w8a8-static", quantizer=quantizer)
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def nncf_export(float_dir: Path, feeds: dict, out: Path, smooth_quant: bool) -> Path:
    import nncf  # optional: the bench extra
    import openvino as ov

    core = ov.Core()
    for graph in GRAPHS:
        model = core.read_model(str(float_dir / f"{graph}.onnx"))
        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if smooth_quant else {}
        quantized = nncf.quantize(model, nncf.Dataset(feeds[graph]), subset_size=len(feeds[graph]), **kwargs)
        out.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, str(out / f"{graph}.xml"))
    _copy_export(float_dir, out, {g: f"{g}.xml" for g in GRAPHS}, "nncf" + ("" if smooth_quant else "-nosq"))
    return out


def ort_quantize_export(float_dir: Path, feeds: dict, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, rows):
            self.rows = iter(rows)

        def get_next(self):
            return next(self.rows, None)

    out.mkdir(parents=True, exist_ok=True)
    for graph in GRAPHS:
        # MatMul / Gemm / Conv only: by default it also quantizes the embedding Gather, which then fails
        quantize_static(str(float_dir / f"{graph}.onnx"), str(out / f"{graph}.onnx"), Reader(feeds[graph]),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    _copy_export(float_dir, out, {g: f"{g}.onnx" for g in GRAPHS}, "ort-quantize_static")
    return out


# ---- accuracy -------------------------------------------------------------------------------------
def accuracy(model, processor, items) -> tuple[float, torch.Tensor]:
    replies, logits = answer_by_image(model, processor, [i.image_path for i in items], [i.question for i in items],
                                      max_new_tokens=3, images_per_batch=4)
    return easyvqa_accuracy_of(replies, items), logits


# ---- speed ------------------------------------------------------------------------------------------
def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def prefill_and_decode(model, batch: dict, new_tokens: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, cpu) of the prefill, and of `new_tokens` single-token decode steps after it."""
    state = {}

    def prefill():
        with torch.no_grad():
            state["out"] = model(**batch, use_cache=True, logits_to_keep=1)

    def decode():
        out, mask = state["out"], batch["attention_mask"]
        with torch.no_grad():
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                            logits_to_keep=1)

    return timed(prefill), timed(decode)


def speed(models: dict, batch: dict, rounds: int, new_tokens: int) -> dict[str, dict]:
    samples = {name: [] for name in models}
    for name, model in models.items():  # warm-up (first-call allocations, kernel packing)
        prefill_and_decode(model, batch, 2)
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(prefill_and_decode(model, batch, new_tokens))
    result = {}
    for name, runs in samples.items():
        prefill_wall = [p[0] for p, _ in runs]
        result[name] = {"prefill_ms": 1e3 * statistics.median(prefill_wall),
                        "prefill_ms_min_max": [1e3 * min(prefill_wall), 1e3 * max(prefill_wall)],
                        "prefill_cpu_ms": 1e3 * statistics.median(p[1] for p, _ in runs),
                        "decode_tokens_per_s": new_tokens / statistics.median(d[0] for _, d in runs),
                        "decode_cpu_tokens_per_s": new_tokens / statistics.median(d[1] for _, d in runs)}
    base = result["bf16"]
    for row in result.values():
        row["prefill_speedup_vs_bf16"] = base["prefill_ms"] / row["prefill_ms"]
        row["prefill_cpu_speedup_vs_bf16"] = base["prefill_cpu_ms"] / row["prefill_cpu_ms"]
        row["decode_speedup_vs_bf16"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mquant-dir", required=True, help="MQuant W8A8 static directory written by `mquant quantize`")
    parser.add_argument("--mquant-w4a8-dir", default=None, help="MQuant W4A8 static directory: adds its rows")
    parser.add_argument("--work", default="/tmp/cpu_runtimes", help="where the exports are written (reused if present)")
    parser.add_argument("--limit", type=int, default=1000, help="easy-VQA test questions (0: the whole split)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: accuracy, speed, nncf, ortq")
    parser.add_argument("--out", default="benchmarks/results/cpu_runtimes.json")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    loaded = load_float_model(None)
    processor = loaded.processor
    dirs = {"mquant": work / "mquant_onnx", "float": work / "float_onnx", "nncf": work / "nncf", "nncf-nosq": work / "nncf_nosq",
            "ortq": work / "ortq"}
    if not (dirs["mquant"] / CONFIG_NAME).exists():
        log("exporting MQuant W8A8 to ONNX"), export_onnx(args.mquant_dir, dirs["mquant"])
    if args.mquant_w4a8_dir and not (work / "mquant_w4a8_onnx" / CONFIG_NAME).exists():
        log("exporting MQuant W4A8 to ONNX"), export_onnx(args.mquant_w4a8_dir, work / "mquant_w4a8_onnx")
    peers = [p for p in ("nncf", "nncf-nosq", "ortq") if p.split("-")[0] not in skip]
    failed: dict[str, str] = {}
    if peers and not (dirs["float"] / CONFIG_NAME).exists():
        log("exporting the float model to ONNX"), export_onnx(loaded.model, dirs["float"], processor, allow_float=True)
    if any(not (dirs[p] / CONFIG_NAME).exists() for p in peers):
        samples = build_calibration_inputs(CalibConfig(n_samples=16), processor, loaded.model)
        feeds = calibration_feeds(dirs["float"], samples)
        for peer in peers:
            if not (dirs[peer] / CONFIG_NAME).exists():
                log(f"quantizing with {peer}")
                start = time.perf_counter()
                try:
                    if peer == "ortq":
                        ort_quantize_export(dirs["float"], feeds, dirs[peer])
                    else:
                        nncf_export(dirs["float"], feeds, dirs[peer], smooth_quant=peer == "nncf")
                except Exception as exc:  # a peer that fails is reported, the other rows still run
                    failed[peer] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    log(f"  {peer} failed: {failed[peer]}")
                    continue
                log(f"  {peer}: {time.perf_counter() - start:.0f} s")
    peers = [p for p in peers if p not in failed]
    ours = {"mquant-torch": _on_kernels(args.mquant_dir)}
    variant_dirs = {"mquant-ort": (dirs["mquant"], "onnxruntime"), "mquant-ov": (dirs["mquant"], "openvino"),
                    **{f"{p}-{'ort' if p == 'ortq' else 'ov'}": (dirs[p], "onnxruntime" if p == "ortq" else "openvino") for p in peers}}
    if args.mquant_w4a8_dir:
        ours["mquant-w4a8-torch"] = _on_kernels(args.mquant_w4a8_dir)
        variant_dirs.update({"mquant-w4a8-ort": (work / "mquant_w4a8_onnx", "onnxruntime"),
                             "mquant-w4a8-ov": (work / "mquant_w4a8_onnx", "openvino")})
    report = {"limit": args.limit, "machine": "2-core shared AVX-512-VNNI VM (noisy, +-25%)", "torch": torch.__version__,
              "failed_peers": failed}
    out = Path(args.out)
    save = lambda: out.write_text(json.dumps(report, indent=2))  # noqa: E731  # after every row: long runs
    if "speed" not in skip:
        run_speed(report, ours, variant_dirs, processor, args, save)
    if "accuracy" not in skip:
        run_accuracy(report, loaded.model, ours, variant_dirs, processor, args.limit, save)
    save()
    print(json.dumps(report))


def run_speed(report: dict, ours, variant_dirs: dict, processor, args, save) -> None:
    batch = default_model_bench_inputs(processor, 256, 32)
    report["prompt_tokens"] = int(batch["input_ids"].shape[1])
    report["visual_tokens"] = 256
    bf16 = load_float_model(None).model.to(torch.bfloat16)
    bf16_batch = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    report["speed"] = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        models = {"bf16": _BF16(bf16, bf16_batch), **ours,
                  **{n: RuntimeVLM(d, r, threads=threads) for n, (d, r) in variant_dirs.items()}}
        report["speed"][str(threads)] = speed(models, batch, args.rounds, args.new_tokens)
        for name, row in report["speed"][str(threads)].items():
            log(f"{threads} thr {name:16s} prefill {row['prefill_ms']:8.1f} ms ({row['prefill_speedup_vs_bf16']:.2f}x)  "
                f"decode {row['decode_tokens_per_s']:6.1f} tok/s ({row['decode_speedup_vs_bf16']:.2f}x)")
        del models
        save()


def run_accuracy(report: dict, float_model, ours, variant_dirs: dict, processor, limit: int, save) -> None:
    torch.set_num_threads(2)
    items = load_split("test")[: limit or None]
    report["accuracy"] = rows = {}
    float_acc, float_logits = accuracy(float_model, processor, items)
    rows["float32-torch"] = {"accuracy": float_acc, "kl": 0.0, "top1_agreement": 1.0}
    candidates = {**{n: (lambda m=m: m) for n, m in ours.items()},
                  **{n: (lambda d=d, r=r: RuntimeVLM(d, r)) for n, (d, r) in variant_dirs.items()}}
    for name, make in candidates.items():
        start = time.perf_counter()
        acc, logits = accuracy(make(), processor, items)
        fid = next_token_fidelity(float_logits, logits)
        rows[name] = {"accuracy": acc, "kl": fid["kl"], "top1_agreement": fid["top1_agreement"]}
        log(f"{name:16s} accuracy {acc:.4f}  KL {fid['kl']:.4f}  ({time.perf_counter() - start:.0f} s)")
        save()


def _on_kernels(directory: str):
    """A directory written by `mquant quantize`, loaded onto our integer kernels."""
    model = load_quantized(directory)
    attach_kernels(model)
    return model


class _BF16:
    """The bf16 model called with its bf16 pixel values (the others take float32)."""

    def __init__(self, model, batch):
        self.model, self.batch = model, batch

    def __call__(self, **kwargs):
        if kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = self.batch["pixel_values"]
        return self.model(**kwargs)


if __name__ == "__main__":
    main()
