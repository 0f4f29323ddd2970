"""Offloaded quantization: weights stay on disk until their block is calibrated.

The budget test runs the quantization in a child process whose private memory is capped by the
kernel (RLIMIT_DATA: heap, anonymous and private writable mappings — every torch CPU allocation)
at 80% of the float model's size above the child's own baseline, and checks that (a) quantizing the
fully loaded model under the same cap fails, so the cap really bites, and (b) the offloaded run
succeeds and gives exactly the quantized model and logits of an unconstrained in-memory run.
glibc's malloc is pinned to mmap every allocation >= 128 KiB and return freed memory at once, so
the accounting follows live tensors instead of allocator history.
"""

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from mquant.api import load_quantized, quantize, quantize_offloaded, save_quantized
from mquant.calib.offload import load_offloaded, materialize
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.qwen2_vl import QWEN_LAYOUT, build_mrope_batch

RECIPE = recipe_for("smoothquant", "w8a8")  # SmoothQuant edits norms in place: they must persist

CHILD = r"""
import hashlib, json, resource, sys
import torch
torch.set_num_threads(1)
from mquant.api import quantize_offloaded
from mquant.calib.offload import load_offloaded, uncached_dequant
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.testing.tiny.qwen2_vl import QWEN_LAYOUT, build_mrope_batch

def vmdata():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData:"))

mode, model_dir, off_dir, budget, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
model = load_offloaded(model_dir, offload_folder=off_dir, attn_implementation="eager")
samples = [build_mrope_batch(model, QWEN_LAYOUT, 1, i, False, False) for i in range(2)]
batch = build_mrope_batch(model, QWEN_LAYOUT, 2, 50, True, False)
base = vmdata()
resource.setrlimit(resource.RLIMIT_DATA, (base + budget, base + budget))
result = {}
try:
    if mode == "in-memory":
        from transformers import AutoModelForImageTextToText
        from mquant.api import quantize
        full = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        quantize(full, recipe_for("smoothquant", "w8a8"), samples)
    else:
        report, session = quantize_offloaded(model, recipe_for("smoothquant", "w8a8"), samples)
        with torch.no_grad(), uncached_dequant(model):
            logits = model(**batch).logits
        result["logits"] = hashlib.sha256(logits.numpy().tobytes()).hexdigest()
        result["layers"] = {n: hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                            for t in (m.qweight, m.w_scale, m.act_scale))).hexdigest() for n, m in quant_linears(model).items()}
        result["loaded_bytes"] = session.loaded_bytes
    result["ok"] = True
except (MemoryError, RuntimeError) as exc:
    result["ok"], result["error"] = False, f"{type(exc).__name__}: {str(exc)[:160]}"
json.dump(result, open(out, "w"))
"""


def _layer_hash(m):
    return hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (m.qweight, m.w_scale, m.act_scale))).hexdigest()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A Qwen2-VL with a 6-layer, 512-wide language model: ~74 MB of float32 weights on disk."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mquant.testing.tiny.qwen2_vl import _IDS, finish_tiny, text_config

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 512, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}
    text = text_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_IDS)
    config._attn_implementation = "eager"
    model = finish_tiny(Qwen2VLForConditionalGeneration(config), 0, torch.float32)
    path = tmp_path_factory.mktemp("big") / "float"
    model.save_pretrained(path)
    return model, path, sum(p.numel() * p.element_size() for p in model.parameters())


def test_offloaded_quantization_fits_a_budget_below_the_model_size(big_model, tmp_path):
    model, path, model_bytes = big_model
    budget = int(0.8 * model_bytes)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = {mode: subprocess.Popen([sys.executable, "-c", CHILD, mode, str(path), str(tmp_path / f"off-{mode}"), str(budget),
                                     str(tmp_path / f"{mode}.json")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for mode in ("in-memory", "offloaded")}
    # Meanwhile, the reference: the fully loaded model quantized without any limit.
    samples = [build_mrope_batch(model, QWEN_LAYOUT, 1, i, False, False) for i in range(2)]
    batch = build_mrope_batch(model, QWEN_LAYOUT, 2, 50, True, False)
    reference = copy.deepcopy(model)
    quantize(reference, RECIPE, samples)
    with torch.no_grad():
        logits = hashlib.sha256(reference(**batch).logits.numpy().tobytes()).hexdigest()
    for mode, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    in_memory = json.loads((tmp_path / "in-memory.json").read_text())
    offloaded = json.loads((tmp_path / "offloaded.json").read_text())
    assert not in_memory["ok"], "the budget does not bite: quantizing the fully loaded model fit in it"
    assert any(s in in_memory["error"] for s in ("allocate memory", "Cannot allocate memory", "can't start new thread")), in_memory
    assert offloaded["ok"], offloaded.get("error")
    assert offloaded["layers"] == {n: _layer_hash(m) for n, m in quant_linears(reference).items()}
    assert offloaded["logits"] == logits
    assert offloaded["loaded_bytes"] < model_bytes  # embeddings and lm_head were only streamed


def test_offloaded_equals_in_memory_and_saves(tmp_path):
    case = tiny_case("qwen2_vl")
    case.model.save_pretrained(tmp_path / "float")
    samples = [case.batch(batch_size=1, seed=i) for i in range(2)]
    reference = copy.deepcopy(case.model)
    quantize(reference, RECIPE, samples)
    model = load_offloaded(tmp_path / "float", offload_folder=tmp_path / "off", attn_implementation="eager")
    assert next(model.model.language_model.layers[0].parameters()).device.type == "meta"
    quantize_offloaded(model, RECIPE, samples)
    layers = quant_linears(model)
    assert all(torch.equal(layers[n].qweight, m.qweight) and torch.equal(layers[n].act_scale, m.act_scale)
               for n, m in quant_linears(reference).items())
    batch = case.batch(batch_size=2, seed=9, text_only_row=True)
    with torch.no_grad():
        expected = reference(**batch).logits
        assert torch.equal(model(**batch).logits, expected)
    assert materialize(model) > 0  # embeddings, lm_head, final norm: loaded only now, to save
    save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(**batch).logits, expected)
