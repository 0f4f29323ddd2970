"""Real transformers processors for the tiny models, built offline: a word-level tokenizer over the
tiny vocabulary (`t<id>` for ordinary ids, the family's special tokens at the ids the tiny config
uses) and the family's image processor configured for the tiny image geometry. A saved tiny model
plus one of these is a directory `mquant quantize` and serving engines can load like a hub one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mquant.io.processors import image_only
from mquant.testing.tiny.llava import IMAGE_ID as LLAVA_IMAGE_ID
from mquant.testing.tiny.llava import PAD_ID, VOCAB
from mquant.testing.tiny.qwen2_vl import END_ID, IMAGE_ID, START_ID, VIDEO_ID

UNK_ID = 1
# Qwen's ChatML turn, spaced for the whitespace tokenizer; English words become <unk>.
QWEN_CHAT = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
             "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}"
             "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> t2 {% endif %}")
QWEN_SPECIAL = {IMAGE_ID: "<|image_pad|>", VIDEO_ID: "<|video_pad|>", START_ID: "<|vision_start|>", END_ID: "<|vision_end|>",
                252: "<|im_start|>", 253: "<|im_end|>"}


def tiny_tokenizer(special: dict[int, str], vocab_size: int = VOCAB) -> Any:
    """A fast tokenizer splitting on whitespace: ids are `t<id>` words, `special` maps ids to the
    special tokens placed there (never split, kept on decode), PAD_ID is `<pad>`; words outside
    the vocabulary (a calibration prompt's English) become `<unk>`."""
    # lazy: tokenizers/transformers are only needed where a real processor is built
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {i: f"t{i}" for i in range(vocab_size)} | {PAD_ID: "<pad>", UNK_ID: "<unk>"} | dict(special)
    tok = Tokenizer(models.WordLevel({name: i for i, name in names.items()}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(special.values())})
    return fast


def text_of(ids: list[int], special: dict[int, str] = QWEN_SPECIAL) -> str:
    """The prompt text that tokenizes back to `ids`."""
    return " ".join(special.get(i, "<pad>" if i == PAD_ID else f"t{i}") for i in ids)


def tiny_qwen_processor(model: nn.Module) -> Any:
    """The Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor class of `model` with the PIL (slow) image
    processor sized for the tiny vision config (patch 4, merge 2, temporal patch 2; images resized
    to multiples of 8 between 8x8 and 32x32). Without a video processor (transformers' needs
    torchvision, which the install does not have): saved, it is the standard processor files."""
    # lazy: transformers' processor classes take seconds to import
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = model.config.vision_config
    image = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                     merge_size=vision.spatial_merge_size,
                                     size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model.config.model_type])
    return image_only(cls)(image_processor=image, tokenizer=tiny_tokenizer(QWEN_SPECIAL), chat_template=QWEN_CHAT)


def tiny_llava_processor(model: nn.Module) -> Any:
    """LlavaProcessor with a CLIP image processor for the tiny CLIP tower (32x32, patch 8, CLS)."""
    # lazy: transformers' processor classes take seconds to import
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = model.config.vision_config
    side = vision.image_size
    image = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=image, tokenizer=tiny_tokenizer({LLAVA_IMAGE_ID: "<image>"}),
                          patch_size=vision.patch_size, vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                          image_token="<image>", num_additional_image_tokens=1)
