"""The default model, MQuant W8A8 static, exported to ONNX and run by ONNX Runtime and OpenVINO
through the easy-VQA answering path: the same answers as our runtime, first-answer-token logits
within the stated tolerance, and the command line's `--runtime` and bad-input paths."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from mquant.api import quantize, save_quantized
from mquant.calib.data import build_calibration_inputs
from mquant.config import CalibConfig, RTNConfig, recipe_for
from mquant.demo.easyvqa import load_split
from mquant.eval.cpu_runtimes import RuntimeVLM, kernel_census
from mquant.eval.shared_prefix import answer_by_image
from mquant.io.loading import load_float_model
from mquant.io.onnx_export import export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    loaded = load_float_model(None)
    model = copy.deepcopy(loaded.model)
    recipe = replace(recipe_for("mquant", "w8a8"), weights=RTNConfig())  # RTN: the export does not depend on GPTQ
    quantize(model, recipe, build_calibration_inputs(CalibConfig(n_samples=4), loaded.processor, model))
    root = tmp_path_factory.mktemp("default")
    save_quantized(model, root / "w8a8", processor=loaded.processor)
    return model, loaded.processor, export_onnx(root / "w8a8", root / "onnx"), root


@pytest.mark.slow
@pytest.mark.parametrize("runtime,tolerance", [("onnxruntime", 0.1), ("openvino", 0.1)])
def test_default_model_answers_like_our_runtime(default_export, runtime, tolerance):
    """Against our fake-quant reference forward, which the QDQ graphs compute op for op. Tolerance:
    max |Δ first-answer logit| / max |logit|. On the tiny LLaVA models the exports match our runtime to
    4e-7 (ORT) and 4e-3 (OpenVINO f32), but on the default model ORT was measured at 7.4% (two-scale
    recipe) and 3.2% (default recipe) from the reference. Not the export: this quantized model's
    logits follow the last bit of its float maths (our own fake-quant forward moves 4.2% under a
    one-ulp pixel change; our int8 kernels differ from it by 6.9% and answer one of these 12
    questions differently, 2026-12-02, benchmarks/diagnostics/ort_vs_reference.py) because activations at rounding ties flip codes (BENCHMARKS.md,
    ONNX section). So no relative bound below that spread holds for a correct runtime; 10% catches a
    real mismatch (a wrong scale or split moves it far more)."""
    model, processor, out, _ = default_export
    items = load_split("test")[:12]
    args = ([i.image_path for i in items], [i.question for i in items])
    ours, our_logits = answer_by_image(model, processor, *args, max_new_tokens=3, images_per_batch=2)
    theirs, their_logits = answer_by_image(RuntimeVLM(out, runtime), processor, *args, max_new_tokens=3, images_per_batch=2)
    assert theirs == ours
    assert float((their_logits - our_logits).abs().max()) <= tolerance * float(our_logits.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_default_model_graphs_run_on_int8_kernels(default_export, runtime):
    model, _, out, _ = default_export
    language = 30 * 7
    census = kernel_census(out, runtime)
    assert census["prefill"]["int8_gemm"] == language and census["decode"]["int8_gemm"] == language, census
    assert census["vision"]["int8_gemm"] == 12 * 6 + 2, census  # DINOv2-small blocks + the projector


@pytest.mark.slow
def test_cli_eval_and_generate_with_a_runtime(default_export):
    _, _, out, _ = default_export
    run = subprocess.run([sys.executable, "-m", "mquant.cli", "eval", str(out), "--runtime", "onnxruntime", "--limit", "8",
                          "--threads", "1", "--json"], capture_output=True, text=True, env=ENV, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    payload = json.loads(run.stdout.strip().splitlines()[-1])
    assert payload["runtime"] == "onnxruntime" and payload["n"] == 8 and payload["accuracy"] >= 0.75
    item = load_split("test")[0]
    run = subprocess.run([sys.executable, "-m", "mquant.cli", "generate", str(out), "--runtime", "openvino", "--image",
                          item.image_path, "--prompt", item.question, "--max-new-tokens", "3", "--json"],
                         capture_output=True, text=True, env=ENV, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["answer"].lower().startswith(item.answer)


@pytest.mark.slow
def test_cli_runtime_on_a_non_export_fails_with_one_line(default_export):
    _, _, _, root = default_export
    run = subprocess.run([sys.executable, "-m", "mquant.cli", "eval", str(root / "w8a8"), "--runtime", "openvino", "--limit", "2"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode != 0 and run.stderr.strip().startswith("error:") and "not an ONNX export" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
