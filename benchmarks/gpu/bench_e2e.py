"""End-to-end part of bench_gpu.py: a random-initialised Qwen2-VL-2B-shaped model (the published
Qwen2-VL-2B-Instruct config values below; nothing is downloaded), prefill of 1024 visual + 64 text
tokens and 32 decode steps, FP16 against W8A8 dynamic (RTN) and MQuant W4A8 / W8A8 static (RTN
weights: the weight algorithm does not change speed; one synthetic calibration sample), each
quantized model running every linear layer on the Triton backend.

Quantization runs in float32 (what the calibration code is tested in); the quantized model is
then cast to FP16 (its QuantLinears keep int codes and float32 prepared scales).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace

import torch

# Qwen/Qwen2-VL-2B-Instruct config.json (text: Qwen2-1.5B-style decoder; vision: 675M ViT).
QWEN2_VL_2B_TEXT = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
                    "bos_token_id": 151643, "eos_token_id": 151645,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
QWEN2_VL_2B_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3, "hidden_size": 1536,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
QWEN2_VL_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653}
# Dry run: the same classes and code paths at toy size (as mquant.testing.tiny's Qwen2-VL).
TINY_TEXT = {**QWEN2_VL_2B_TEXT, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 252,
             "eos_token_id": 253, "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
TINY_VISION = {"depth": 1, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_channels": 3, "hidden_size": 64,
               "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
TINY_IDS = {"image_token_id": 250, "video_token_id": 251, "vision_start_token_id": 248, "vision_end_token_id": 249}
VARIANTS = ("fp16", "w8a8_dynamic", "mquant_w4a8_static", "mquant_w8a8_static")


def build_model(dry: bool, device: torch.device):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text, vision, ids = (TINY_TEXT, TINY_VISION, TINY_IDS) if dry else (QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION, QWEN2_VL_IDS)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    config._attn_implementation = "eager" if dry else "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config)
    return model.float().eval(), ids, vision


def make_batch(ids: dict, vision: dict, visual: int, text: int, device, seed: int) -> dict:
    """One prompt: [text][<vision> `visual` image tokens </vision>][text], grid (1, h, w) patches
    with h * w / merge**2 = visual, as the Qwen2-VL processor lays it out."""
    gen = torch.Generator().manual_seed(seed)
    merge = vision["spatial_merge_size"]
    side = int(round(visual ** 0.5)) * merge
    assert (side // merge) ** 2 == visual, "visual tokens must be a square number"
    head = torch.randint(1, 240, (text // 2 - 1,), generator=gen)
    tail = torch.randint(1, 240, (text - text // 2 - 1,), generator=gen)
    middle = torch.tensor([ids["vision_start_token_id"]] + [ids["image_token_id"]] * visual + [ids["vision_end_token_id"]])
    input_ids = torch.cat([head, middle, tail]).reshape(1, -1)
    kinds = torch.cat([torch.zeros(head.numel() + 1), torch.ones(visual), torch.zeros(tail.numel() + 1)]).long().reshape(1, -1)
    patch_dim = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": kinds,
             "pixel_values": torch.randn(side * side, patch_dim, generator=gen), "image_grid_thw": torch.tensor([[1, side, side]])}
    return {k: v.to(device) for k, v in batch.items()}


def _recipe(name: str):
    from mquant.config import RTNConfig, recipe_for

    if name == "w8a8_dynamic":
        return recipe_for("rtn", "w8a8", "dynamic")
    return replace(recipe_for("mquant", "w4a8" if "w4a8" in name else "w8a8"), weights=RTNConfig())


def _seconds(fn, device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, batch: dict, new_tokens: int, device, reps: int) -> dict:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731

        def generate(tokens: int):
            return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        generate(1)  # warm-up (a prefill inside): Triton compiles, cuBLAS picks algorithms, first allocations
        if device.type == "cuda":
            generate(new_tokens)
        p = _seconds(prefill, device, reps)
        # decode per token: generate(N) - generate(1), both with generate's own set-up, over N - 1 steps
        g1 = _seconds(lambda: generate(1), device, max(1, reps // 2))
        gn = _seconds(lambda: generate(new_tokens), device, max(1, reps // 2))
    return {"prefill_ms": p * 1e3, "decode_ms_per_token": max(gn - g1, 1e-9) * 1e3 / max(1, new_tokens - 1)}


def run_e2e(dry: bool, device: torch.device, start: float, budget_s: float, log) -> list[dict]:
    from mquant.api import quantize
    from mquant.kernels.attach import attach_kernels

    visual, text, new_tokens, reps = (4, 8, 3, 1) if dry else (1024, 64, 32, 3)
    dtype = torch.float32 if dry else torch.float16  # CPU: the interpreter in float32 keeps the dry run short
    float_model, ids, vision = build_model(dry, device)
    calib = [make_batch(ids, vision, visual, text, device, seed=1)]
    batch = make_batch(ids, vision, visual, text, device, seed=2)
    rows, spent = [], []
    for name in VARIANTS:
        began = time.perf_counter()
        if spent and began - start + max(spent) > budget_s:
            rows.append({"variant": name, "error": f"skipped: the {budget_s:.0f} s budget would be exceeded"})
            continue
        model = None
        try:
            model = copy.deepcopy(float_model)
            note = "torch (cuBLAS)"
            if name != "fp16":
                quantize(model, _recipe(name), calib)
                layers = attach_kernels(model, backend="triton", free_reference=True)
                note = f"{layers} layers on triton"
            row = {"variant": name, **measure(model.to(dtype), batch, new_tokens, device, reps), "note": note}
        except Exception as exc:  # report and go on: the per-layer results stand on their own
            row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        spent.append(time.perf_counter() - began)
        log(f"e2e {name:20s} " + (f"prefill {row['prefill_ms']:8.1f} ms  decode {row['decode_ms_per_token']:7.2f} ms/token"
                                  if "prefill_ms" in row else row["error"]))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
