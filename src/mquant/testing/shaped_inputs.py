"""Model inputs for the Qwen2-VL-shaped models of `testing.shapes`: easy-VQA images through the real
`Qwen2VLImageProcessor` (PIL backend; the published patch 14, temporal patch 2, 2x2 merge and CLIP
mean/std), each image resized to `side` x `side` first (448 -> 32x32 patches -> 256 visual tokens,
896 -> 1024).

There is no Qwen tokenizer offline, so the prompt is laid out by hand with the published special
ids — a ChatML user turn ``<|im_start|>user\\n<|vision_start|> N x <|image_pad|> <|vision_end|>
question <|im_end|>\\n<|im_start|>assistant\\n`` — and the question's words as ids hashed from the
words (speed and memory depend on the token count, not on which ids they are).
"""

from __future__ import annotations

import zlib

import torch

from mquant.calib.data import load_calibration_pairs, open_image
from mquant.config import CalibConfig
from mquant.testing.shapes import SPECIAL_IDS, special_ids

IM_START, IM_END, NEWLINE = 151644, 151645, 198  # Qwen2 ChatML ids ("\n" = 198)
USER, ASSISTANT = 872, 77091


def image_processor(side: int):
    """Qwen2-VL's image processor with its published settings, fixed to `side` x `side` inputs."""
    # lazy: transformers' processor classes take seconds to import
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = side * side
    return Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                    size={"shortest_edge": pixels, "longest_edge": pixels})


def word_ids(text: str, vocab: int, count: int | None = None) -> list[int]:
    """Ids for `text`'s words (repeated or cut to `count` ids), clear of the special ids."""
    words = text.split()
    if count is not None:
        words = (words * (count // max(1, len(words)) + 1))[:count]
    return [zlib.crc32(w.encode()) % min(vocab - 32, 151000) + 16 for w in words]


def vqa_inputs(config, n: int, side: int = 448, text_tokens: int | None = None, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """`n` one-image prompts from easy-VQA train pairs (chosen with `seed` as calibration is); the
    question fills `text_tokens` ids when given (else its own word count)."""
    # lazy: PIL only where images are resized
    from PIL import Image

    processor = image_processor(side)
    vocab = config.text_config.vocab_size
    shift = special_ids(vocab)["bos_token_id"] - SPECIAL_IDS["bos_token_id"]  # a scaled-down vocabulary moves them to its top
    start, end = IM_START + shift, IM_END + shift
    merge = config.vision_config.spatial_merge_size
    samples = []
    for pair in load_calibration_pairs(CalibConfig(n_samples=n, seed=seed)):
        image = open_image(pair.image_path).resize((side, side), Image.BICUBIC)
        vision = processor(images=[image], return_tensors="pt")
        tokens = int(vision["image_grid_thw"].prod()) // merge**2
        head = [start, USER % vocab, NEWLINE, config.vision_start_token_id]
        tail = [config.vision_end_token_id, *word_ids(pair.prompt, vocab, text_tokens), end, NEWLINE, start, ASSISTANT % vocab, NEWLINE]
        ids = torch.tensor([head + [config.image_token_id] * tokens + tail])
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == config.image_token_id).long(),
                        "pixel_values": vision["pixel_values"].to(dtype), "image_grid_thw": vision["image_grid_thw"]})
    return samples
