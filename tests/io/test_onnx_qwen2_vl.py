"""ONNX QDQ export of tiny Qwen2-VL (W8A8 static and W4A8 MQuant: MSQ rows, online Hadamard, RMS)
run by ONNX Runtime and OpenVINO: per-grid vision graphs, M-RoPE position ids fed by RuntimeVLM,
logits of prefill and every decode step equal to our runtime's `generate`, the same greedy tokens,
every quantized linear on the runtime's int8 GEMM, and bad input failing with one line.

Tolerances (max |Δlogit| over max |logit|, prefill and 3 decode steps): OpenVINO f32 1e-2 (measured
3e-7 here; 4e-3 on LLaVA, see test_onnx_export.py: it quantizes with x·(1/s), so an activation at a
rounding tie may take the neighbouring code); ONNX Runtime 1e-2: W4A8 measured 2e-7, W8A8 1.7e-3
prefill / 3.5e-3 decode, all from the vision graph (its prefill on our features: 3e-7): ORT agrees
with ONNX's reference evaluator, and its float parts differ from torch's by a few ulps (1e-6), which
moves 1-12 of 2048 activations of a tower layer across a rounding boundary (one code step each);
OpenVINO at its default bf16 float parts 5e-2 (measured 9e-3).
"""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from mquant.api import quantize
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError, InputError
from mquant.eval.cpu_runtimes import RuntimeVLM, check_scheme, kernel_census
from mquant.io.onnx_export import export_onnx
from mquant.io.onnx_mrope import mrope_positions
from mquant.testing.tiny import tiny_case

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

GRIDS = [(1, 8, 8), (1, 4, 8)]  # the two image sizes of the tiny padded batch
RUNS = [("onnxruntime", None, 1e-2), ("openvino", "f32", 1e-2), ("openvino", None, 5e-2)]


@pytest.fixture(scope="module")
def case():
    return tiny_case("qwen2_vl")


@pytest.fixture(scope="module", params=["w8a8", "w4a8"])
def exported(request, case, tmp_path_factory):
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("mquant", request.param), [case.batch(batch_size=1, seed=0)])
    out = export_onnx(model, tmp_path_factory.mktemp(request.param) / "onnx", image_grids=GRIDS)
    return model, out, request.param


def _ours(model, batch, steps: int = 4):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)


def test_runner_positions_equal_get_rope_index(case):
    batch = case.batch(batch_size=3, seed=2, padding=True)
    ours, _ = case.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])
    theirs, _ = mrope_positions(batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                                batch["image_grid_thw"].numpy(), case.model.config.image_token_id, 2)
    assert np.array_equal(theirs, ours.numpy())


@pytest.mark.parametrize("runtime,precision,tolerance", RUNS)
def test_prefill_and_decode_logits_and_tokens_equal_our_runtime(case, exported, runtime, precision, tolerance):
    model, out, scheme = exported
    batch = case.batch(batch_size=2, seed=3, padding=True)  # two image sizes, left padding on one row
    ours = _ours(model, batch)
    runner = RuntimeVLM(out, runtime, precision=precision)
    assert runner.config["scheme"] == f"{scheme}-static"
    step = runner(**batch)
    scale = float(ours.logits[0].abs().max())
    assert float((step.logits[:, -1] - ours.logits[0]).abs().max()) <= tolerance * scale
    new, mask = ours.sequences[:, batch["input_ids"].shape[1]:], batch["attention_mask"]
    for k in range(1, len(ours.logits)):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step = runner(input_ids=new[:, k - 1:k], attention_mask=mask, past_key_values=step.past_key_values)
        assert float((step.logits[:, -1] - ours.logits[k]).abs().max()) <= tolerance * scale
    assert torch.equal(runner.generate(**batch, max_new_tokens=4, min_new_tokens=4, pad_token_id=0), ours.sequences)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_every_quantized_linear_runs_on_int8_kernels(exported, runtime):
    model, out, _ = exported
    layers = quant_linears(model)
    language = sum(1 for layer in layers.values() if layer.modality == "language")
    census = kernel_census(out, runtime)
    assert set(census) == {"vision_1x8x8", "vision_1x4x8", "prefill", "decode"}
    for name in ("vision_1x8x8", "vision_1x4x8"):
        assert census[name]["int8_gemm"] == len(layers) - language, census
    assert census["prefill"]["int8_gemm"] == language and census["decode"]["int8_gemm"] == language, census
    if runtime == "onnxruntime":
        assert all(g["dequantize_fallback"] == 0 and g["dequantize_left"] == 0 for g in census.values()), census


def test_bad_input_fails_with_one_line(case, exported, tmp_path):
    model, out, _ = exported
    with pytest.raises(ConfigError, match="needs the patch grids") as info:
        export_onnx(model, tmp_path / "no_grid")
    assert "\n" not in str(info.value) and not (tmp_path / "no_grid").exists()
    with pytest.raises(ConfigError, match="multiples of 2"):
        export_onnx(model, tmp_path / "odd", image_grids=[(1, 5, 8)])
    batch = case.batch(batch_size=1, seed=1)
    batch["image_grid_thw"] = torch.tensor([[1, 16, 4]])  # same patch count, a grid not exported
    with pytest.raises(InputError, match=r"no vision graph for image grid \(1, 16, 4\)") as info:
        RuntimeVLM(out, "onnxruntime")(**batch)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not 'glm4v'"):
        check_scheme("openvino", {"family": "glm4v", "scheme": "w8a8-static"})
    dynamic = copy.deepcopy(case.model)
    quantize(dynamic, recipe_for("rtn", "w8a8", "dynamic"), [case.batch(batch_size=1, seed=0)])
    with pytest.raises(ConfigError, match="W8A8 / W4A8 static"):
        export_onnx(dynamic, tmp_path / "dyn", image_grids=GRIDS)


def test_cli_rejects_a_malformed_image_grid_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mquant.cli", "export", str(tmp_path), "--format", "onnx", "--out",
                          str(tmp_path / "o"), "--image-grid", "1x8"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.strip().startswith("error: --image-grid '1x8'")
    assert len(run.stderr.strip().splitlines()) == 1
