"""Which NNCF-quantized graph breaks accuracy? Each NNCF graph swapped in alone (the others float),
24 easy-VQA questions through RuntimeVLM on OpenVINO (BENCHMARKS.md, "Peers repaired").

    python benchmarks/diagnostics/nncf_graphs.py MODE [GRAPHS]
MODE: default | transformer | weights_only_matmuls[_nosq][_nobc] (ignore every MatMul without a
2-D constant weight; _nosq: no SmoothQuant; _nobc: no bias correction); GRAPHS: e.g. decode."""
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_runtimes as cr
import nncf
import openvino as ov

from mquant.calib.data import build_calibration_inputs
from mquant.config import CalibConfig
from mquant.demo.easyvqa import load_split
from mquant.eval.cpu_runtimes import RuntimeVLM
from mquant.io.loading import load_float_model
from mquant.io.onnx_export import CONFIG_NAME, export_onnx

work = Path("/tmp/nncf_diag"); work.mkdir(parents=True, exist_ok=True)
loaded = load_float_model(None); proc = loaded.processor
fdir = work / "float_onnx"
if not (fdir / CONFIG_NAME).exists():
    export_onnx(loaded.model, fdir, proc, allow_float=True)
samples = build_calibration_inputs(CalibConfig(n_samples=16), proc, loaded.model)
feeds = cr.calibration_feeds(fdir, samples)
core = ov.Core()
mode = sys.argv[1] if len(sys.argv) > 1 else "default"
only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(cr.GRAPHS)
qdir = work / f"nncf_{mode}"; qdir.mkdir(exist_ok=True)
for g in only:
    model = core.read_model(str(fdir / f"{g}.onnx"))
    kwargs = {}
    if mode == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if mode.startswith("weights_only_matmuls"):
        # ignore every MatMul whose second input is not a constant (attention) and everything not MatMul
        names = []
        for op in model.get_ordered_ops():
            if op.get_type_name() == "MatMul":
                src = op.input_value(1).get_node()
                while src.get_type_name() in ("Convert", "Transpose", "Reshape"):
                    src = src.input_value(0).get_node()
                if src.get_type_name() != "Constant" or len(src.get_output_shape(0)) != 2 or min(src.get_output_shape(0)) < 64:
                    names.append(op.get_friendly_name())
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=names, validate=False)
        if "nosq" not in mode:
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        if "nobc" in mode:
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
            kwargs["advanced_parameters"] = AdvancedQuantizationParameters(disable_bias_correction=True)
        print(g, "ignored attention matmuls", len(names), flush=True)
    t = time.time()
    q = nncf.quantize(model, nncf.Dataset(feeds[g]), subset_size=len(feeds[g]), **kwargs)
    fq = [op for op in q.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    consumers = {}
    for op in fq:
        for out in op.outputs():
            for t_in in out.get_target_inputs():
                n = t_in.get_node().get_type_name(); consumers[n] = consumers.get(n, 0) + 1
    print(g, "quantized in", round(time.time() - t), "s; FakeQuantize consumers", consumers, flush=True)
    ov.save_model(q, str(qdir / f"{g}.xml"))
items = load_split("test")[:24]
float_acc, float_logits = cr.accuracy(loaded.model, proc, items)
print("float", float_acc, flush=True)
from mquant.eval.fidelity import next_token_fidelity

for mix in ([tuple(only)] if len(sys.argv) > 2 else [("vision",), ("prefill",), ("decode",), ("vision", "prefill", "decode")]):
    d = work / f"mix_{mode}_{'_'.join(mix)}"
    shutil.rmtree(d, ignore_errors=True)
    files = {}
    d.mkdir()
    for item in fdir.iterdir():
        if item.suffix != ".onnx" and item.name != CONFIG_NAME:
            shutil.copy(item, d / item.name)
    cfg = json.loads((fdir / CONFIG_NAME).read_text())
    for g in cr.GRAPHS:
        if g in mix:
            shutil.copy(qdir / f"{g}.xml", d / f"{g}.xml"); shutil.copy(qdir / f"{g}.bin", d / f"{g}.bin"); cfg["graphs"][g]["file"] = f"{g}.xml"
        else:
            shutil.copy(fdir / f"{g}.onnx", d / f"{g}.onnx")
            for extra in fdir.glob(f"{g}.onnx*"):
                shutil.copy(extra, d / extra.name)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    acc, logits = cr.accuracy(RuntimeVLM(d, "openvino"), proc, items)
    print("nncf on", mix, "acc", acc, "KL", round(next_token_fidelity(float_logits, logits)["kl"], 4), flush=True)
