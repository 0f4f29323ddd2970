"""Tiny LLaVA models: `llava` (CLIP tower, vision_feature_layer=-2, LLaMA text) and `llava_dinov2`
(the project's default shape: DINOv2 tower with LayerScale, vision_feature_layer=-1, "default"
strategy dropping CLS, tied SmolLM2-style LLaMA text).

Also the batch-building helpers the other tiny VLM factories share: `image_text_batch` lays out
rows `[pad][text][image block][text]` and `perturb_affines` gives norms and layer scales random
values (default init is 1/0, which would hide a norm or scale that a spec forgets).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mquant.models.norm_kind import norm_kind
from mquant.testing.tiny import TinyCase, register_tiny

VOCAB = 256
PAD_ID = 0
IMAGE_ID = 255
TEXT_IDS = (1, 240)  # random text tokens stay clear of pad and of the special ids at the top


def perturb_affines(model: nn.Module, seed: int) -> None:
    """Random norm weights/biases and layer scales, so folding them wrongly changes the output."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if norm_kind(mod) is not None or type(mod).__name__.endswith("LayerScale"):
                for name, param in mod.named_parameters(recurse=False):
                    base = 0.0 if name == "bias" else 1.0
                    param.copy_(base + 0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
            for name in ("lambda_1", "lambda_2"):  # InternViT keeps its layer scales on the layer
                param = getattr(mod, name, None)
                if isinstance(param, nn.Parameter):
                    param.copy_(0.5 + torch.rand(param.shape, generator=gen, dtype=param.dtype))


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def image_text_batch(
    batch_size: int,
    seed: int,
    text_only_row: bool,
    padding: bool,
    image_block: list[int],
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """(input_ids, attention_mask, has_image per row). Each image row is `[text][image_block][text]`;
    with `padding` rows get different text lengths and are LEFT-padded with PAD_ID; the last row is
    text only when `text_only_row` (padded, or filled with text to the common length otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    has_image = [not (text_only_row and row == batch_size - 1) for row in range(batch_size)]
    rows = []
    for row in range(batch_size):
        pre, post = 2 + (row if padding else 0), 3 + (row % 2 if padding else 0)
        body = image_block if has_image[row] else []
        n_text = pre + post if has_image[row] or padding else pre + post + len(image_block)
        text = torch.randint(*TEXT_IDS, (n_text,), generator=gen).tolist()
        rows.append(text[:pre] + body + text[pre:])
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, seq in enumerate(rows):
        input_ids[i, width - len(seq):] = torch.tensor(seq)
        attention_mask[i, width - len(seq):] = 1
    return input_ids, attention_mask, has_image


def set_attention(config) -> None:
    """Eager attention everywhere except the language model, which gets SDPA: transformers' eager
    decoder attention runs softmax in float32, so in float64 the finfo(float64).min mask becomes
    -inf, fully masked left-padding rows turn NaN, and 0 * NaN spreads NaN over the whole row. SDPA
    keeps float64 and gives the same float32 results."""
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "sdpa"


def tiny_llama(hidden: int = 64, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD_ID,
        tie_word_embeddings=tie,
    )


def llava_case(family: str, config: LlavaConfig, seed: int, dtype: torch.dtype, image_size: int,
                image_tokens: int) -> TinyCase:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    perturb_affines(model, seed)
    model = model.to(dtype)

    def make_batch(batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        ids, mask, has_image = image_text_batch(batch_size, seed, text_only_row, padding, [IMAGE_ID] * image_tokens)
        batch = {"input_ids": ids, "attention_mask": mask}
        n_images = sum(has_image)
        if n_images:
            gen = torch.Generator().manual_seed(seed + 7)
            pixels = torch.randn((n_images, 3, image_size, image_size), generator=gen)
            batch["pixel_values"] = pixels.to(model_dtype(model))
        return batch

    return TinyCase(family, model, make_batch)


def llava_config(vision_config, tie: bool, **kwargs) -> LlavaConfig:
    config = LlavaConfig(
        vision_config=vision_config, text_config=tiny_llama(tie=tie), image_token_index=IMAGE_ID,
        projector_hidden_act="gelu", tie_word_embeddings=tie, **kwargs,
    )
    set_attention(config)
    return config


def tiny_clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=32)


@register_tiny("llava")
def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    """CLIP 32x32 images, patch 8 -> 16 patches (+CLS); LLaVA-1.5 settings: layer -2, "default"."""
    config = llava_config(tiny_clip(), tie=False, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return llava_case("llava", config, seed, dtype, 32, (32 // 8) ** 2)


@register_tiny("llava_dinov2")
def tiny_llava_dinov2(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    """DINOv2 28x28 images, patch 7 -> 16 patches; layer -1 (raw, pre-final-norm), CLS dropped."""
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=28, patch_size=7, layerscale_value=1.0)
    config = llava_config(vision, tie=True, vision_feature_layer=-1, vision_feature_select_strategy="default")
    return llava_case("llava_dinov2", config, seed, dtype, 28, (28 // 7) ** 2)

