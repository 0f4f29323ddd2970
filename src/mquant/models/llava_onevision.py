"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP (or any supported AutoModel
tower) -> LLaVA MLP projector -> Qwen2.

Same vision read as LLaVA (`hidden_states[vision_feature_layer]`, pre-final-norm, so `linear_1`
is a raw reader; default layer -1, strategy "full"). What differs is how image rows enter the
language stream: `pack_image_features` regroups the projected anyres crops, unpads them, and
appends the learned `image_newline` vector after every row of the crop grid (videos: once after
all frames). Those newline rows sit at image-token positions and write the language stream, so
`image_newline` (axis -1) is a language input writer next to the word embeddings and
`linear_2`'s weight/bias; the visual token mask (image and video placeholder ids) covers them.
Bilinear unpad/resize and video pooling are linear per channel, so a rotation of linear_2's
output commutes with them.
"""

from __future__ import annotations

from torch import nn

from mquant.models.llava import LlavaAdapter
from mquant.models.naming import ModuleNames
from mquant.models.registry import register


@register
class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA's spec plus the learned `image_newline` vector as a language-stream writer."""

    family = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)

    def _extra_language_writers(self, names: ModuleNames, core: nn.Module) -> tuple:
        return (names.param(core, "image_newline", -1),)

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id), int(model.config.video_token_id))
