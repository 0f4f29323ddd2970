"""Default model, RTN W8A8 MQuant (4 calibration samples): 12 questions answered by our int8 kernels,
by our fake-quant reference and by the ONNX export in ONNX Runtime; answer flips and max |logit|
difference (tests/eval/test_cpu_runtimes.py docstring).

    python benchmarks/diagnostics/ort_vs_reference.py OBSERVER FIRST_TOKEN(0|1)
"""
import copy
import sys
from dataclasses import replace

from mquant.api import quantize, save_quantized
from mquant.calib.data import build_calibration_inputs
from mquant.config import CalibConfig, RTNConfig, recipe_for
from mquant.demo.easyvqa import load_split
from mquant.eval.cpu_runtimes import RuntimeVLM
from mquant.eval.shared_prefix import answer_by_image
from mquant.io.loading import load_float_model
from mquant.io.onnx_export import export_onnx
from mquant.kernels.attach import attach_kernels

loaded = load_float_model(None)
samples = build_calibration_inputs(CalibConfig(n_samples=4), loaded.processor, loaded.model)
items = load_split("test")[:12]
args = ([i.image_path for i in items], [i.question for i in items])
for obs, first in [(sys.argv[1], sys.argv[2] == "1")]:
    model = copy.deepcopy(loaded.model)
    quantize(model, replace(recipe_for("mquant", "w8a8", observer=obs, first_token=first), weights=RTNConfig()), samples)
    root = f"/tmp/ortdiag_{obs}_{int(first)}"
    save_quantized(model, root + "/q", processor=loaded.processor)
    attach_kernels(model)
    out = export_onnx(root + "/q", root + "/onnx")
    ours, ol = answer_by_image(model, loaded.processor, *args, max_new_tokens=3, images_per_batch=2)
    theirs, tl = answer_by_image(RuntimeVLM(out, "onnxruntime"), loaded.processor, *args, max_new_tokens=3, images_per_batch=2)
    print("RESULT", obs, first, sum(a != b for a, b in zip(ours, theirs)), float((tl - ol).abs().max() / ol.abs().max()), [(a, b) for a, b in zip(ours, theirs) if a != b], flush=True)
    from mquant.io.loader import load_quantized
    refm = load_quantized(root + "/q")  # fake-quant reference path (no kernels)
    rr, rl = answer_by_image(refm, loaded.processor, *args, max_new_tokens=3, images_per_batch=2)
    print("REF", sum(a != b for a, b in zip(ours, rr)), float((rl - ol).abs().max() / ol.abs().max()), "ort-vs-ref", float((tl - rl).abs().max() / rl.abs().max()), sum(a != b for a, b in zip(theirs, rr)), flush=True)
