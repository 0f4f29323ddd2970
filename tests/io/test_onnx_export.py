"""ONNX QDQ export run by ONNX Runtime and OpenVINO on tiny LLaVA models: logits equal our runtime's,
every quantized linear runs on the runtime's int8 GEMM (no dequantise-to-float fallback), and
schemes the runtimes cannot run fail with one line.

Tolerances (max |Δlogit| over max |logit|): ONNX Runtime computes our float32 maths and our codes
(2e-4, measured ~4e-7); OpenVINO with its float parts in f32: 1e-2 (measured 4e-3: it quantizes by
multiplying with 1/s, so an activation near a rounding tie can get the neighbouring code); at its
default bf16 for the float parts (attention, norms, the float lm_head): 5e-2 (measured ~1.5e-2).
"""

import copy
import json
import subprocess
import sys

import pytest
import torch

from mquant.api import quantize, save_quantized
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.eval.cpu_runtimes import RuntimeVLM, check_scheme, kernel_census
from mquant.io.onnx_export import CONFIG_NAME, export_onnx
from mquant.testing.tiny import tiny_case

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

FAMILIES = ("llava", "llava_dinov2")
# (runtime, OpenVINO float precision, max |Δlogit| as a fraction of max |logit|)
RUNS = [("onnxruntime", None, 2e-4), ("openvino", "f32", 1e-2), ("openvino", None, 5e-2)]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    case = tiny_case(request.param)
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("mquant", "w8a8"), [case.batch(batch_size=1, seed=0)])
    out = export_onnx(model, tmp_path_factory.mktemp(request.param) / "onnx")
    return case, model, out


def _two_steps(model, batch):
    """Our runtime: prefill (last logits), then two new tokens at once against the cache."""
    with torch.no_grad():
        first = model(**batch, use_cache=True)
        last = first.logits[:, -1]
        new = torch.stack([last.argmax(-1), last.argmin(-1)], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
        step = model(input_ids=new, attention_mask=mask, past_key_values=first.past_key_values).logits
    return last, new, mask, step


def test_export_writes_graphs_and_feeding_config(exported):
    _, model, out = exported
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["scheme"] == "w8a8-static" and set(config["graphs"]) == {"vision", "prefill", "decode"}
    assert all((out / g["file"]).is_file() for g in config["graphs"].values())
    n_layers = model.config.text_config.num_hidden_layers
    assert config["graphs"]["decode"]["inputs"][:3] == ["input_ids", "attention_mask", "past_attention_mask"]
    assert len(config["graphs"]["prefill"]["outputs"]) == 1 + 2 * n_layers
    assert config["image_token_id"] == model.config.image_token_index


@pytest.mark.parametrize("runtime,precision,tolerance", RUNS)
def test_prefill_and_decode_logits_equal_our_runtime(exported, runtime, precision, tolerance):
    case, model, out = exported
    batch = case.batch(batch_size=2, seed=3, padding=True)  # left padding on one row
    last, new, mask, step = _two_steps(model, batch)
    runner = RuntimeVLM(out, runtime, precision=precision)
    first = runner(**batch)
    second = runner(input_ids=new, attention_mask=mask, past_key_values=first.past_key_values)
    scale = float(last.abs().max())
    assert float((first.logits[:, -1] - last).abs().max()) <= tolerance * scale
    assert float((second.logits - step).abs().max()) <= tolerance * scale


def _live_linears(model) -> tuple[int, int]:
    """(vision + projector, language) quantized linears that reach the output (CLIP at
    vision_feature_layer=-2 never runs its last layer)."""
    layers = quant_linears(model)
    language = sum(1 for layer in layers.values() if layer.modality == "language")
    vision = len(layers) - language
    cfg = model.config
    if cfg.vision_feature_layer == -2:
        vision -= sum(1 for name in layers if f"layers.{cfg.vision_config.num_hidden_layers - 1}." in name and "vision" in name)
    return vision, language


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_every_quantized_linear_runs_on_int8_kernels(exported, runtime):
    _, model, out = exported
    vision, language = _live_linears(model)
    census = kernel_census(out, runtime)
    assert census["vision"]["int8_gemm"] == vision, census
    assert census["prefill"]["int8_gemm"] == language and census["decode"]["int8_gemm"] == language, census
    if runtime == "onnxruntime":
        assert all(g["dequantize_fallback"] == 0 and g["dequantize_left"] == 0 for g in census.values()), census


def test_schemes_the_runtimes_cannot_run_fail_with_one_line(exported, tmp_path):
    case, _, _ = exported
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w8a8", "dynamic"), [case.batch(batch_size=1, seed=0)])
    with pytest.raises(ConfigError, match="W8A8 / W4A8 static") as info:
        export_onnx(model, tmp_path / "dyn")
    assert "\n" not in str(info.value) and not (tmp_path / "dyn").exists()
    with pytest.raises(ConfigError, match="openvino cannot run scheme 'w4a8-static-g128'"):
        check_scheme("openvino", {"scheme": "w4a8-static-g128"})
    grouped = copy.deepcopy(case.model)
    quantize(grouped, recipe_for("rtn", "w4a8", group_size=16), [case.batch(batch_size=1, seed=0)])
    with pytest.raises(ConfigError, match="per-channel weights"):
        export_onnx(grouped, tmp_path / "grouped")


def test_w4a8_exports_exactly_on_the_int8_kernels(tmp_path):
    """4-bit codes in int8 tensors: ORT gives our W4A8 logits (same maths) on its int8 GEMMs.
    Min-max scales: with MSE clipping a few activations of this tiny model sit exactly on a rounding
    tie and an ulp of float-order difference flips a code (measured 1.3e-3; tests/kernels/test_attach.py)."""
    case = tiny_case("llava_dinov2")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("mquant", "w4a8", observer="minmax"), [case.batch(batch_size=1, seed=0)])
    out = export_onnx(model, tmp_path / "w4a8")
    batch = case.batch(batch_size=2, seed=5, padding=True)
    last, new, mask, step = _two_steps(model, batch)
    runner = RuntimeVLM(out, "onnxruntime")
    assert runner.config["scheme"] == "w4a8-static"
    first = runner(**batch)
    assert float((first.logits[:, -1] - last).abs().max()) <= 2e-4 * float(last.abs().max())
    assert kernel_census(out, "onnxruntime")["prefill"]["dequantize_fallback"] == 0


def test_cli_exports_a_saved_directory_and_rejects_a_dynamic_one(tmp_path):
    case = tiny_case("llava")
    static, dynamic = copy.deepcopy(case.model), copy.deepcopy(case.model)
    quantize(static, recipe_for("mquant", "w8a8"), [case.batch(batch_size=1, seed=0)])
    quantize(dynamic, recipe_for("rtn", "w8a8", "dynamic"), [case.batch(batch_size=1, seed=0)])
    save_quantized(static, tmp_path / "static")
    save_quantized(dynamic, tmp_path / "dynamic")
    cli = [sys.executable, "-c", "from mquant.cli import main; main()", "export"]
    ok = subprocess.run([*cli, str(tmp_path / "static"), "--format", "onnx", "--out", str(tmp_path / "onnx"), "--json"],
                        capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["format"] == "onnx"
    assert RuntimeVLM(tmp_path / "onnx", "onnxruntime").config["scheme"] == "w8a8-static"
    bad = subprocess.run([*cli, str(tmp_path / "dynamic"), "--format", "onnx", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=900)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ONNX export supports W8A8 / W4A8 static")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_runtime_generate_gives_our_greedy_tokens(exported):
    """RuntimeVLM.generate (what `mquant generate --runtime` and the local benchmarks call)."""
    case, model, out = exported
    batch = case.batch(batch_size=2, seed=4, padding=True)
    with torch.no_grad():
        ours = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    theirs = RuntimeVLM(out, "onnxruntime").generate(**batch, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_any_image_count_gives_our_visual_features(exported, runtime):
    """Three images, whatever image count the exporter fixed (or not): each image's projected
    features equal our runtime's (a fixed count runs in padded chunks)."""
    case, model, out = exported
    pixels = torch.cat([case.batch(batch_size=1, seed=s)["pixel_values"] for s in (5, 6, 7)])
    with torch.no_grad():
        ours = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    ours = torch.cat(list(ours)) if isinstance(ours, (list, tuple)) else ours
    theirs = torch.from_numpy(RuntimeVLM(out, runtime, precision="f32").image_features(pixels))
    ours = ours.reshape(-1, ours.shape[-1])
    assert theirs.shape == ours.shape
    assert float((theirs - ours).abs().max()) <= 1e-2 * float(ours.abs().max())
