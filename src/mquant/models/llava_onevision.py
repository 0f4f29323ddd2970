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

from .base import ModelAdapter
from .llava import decoder_tower_spec, linear_writers, mlp_projector_spec
from .registry import register
from .spec import ModelSpec
from .vision_towers import ModuleNames, describe_vision_tower, resolve_feature_layers, vision_tower_spec


@register
class LlavaOnevisionAdapter(ModelAdapter):
    family = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)

    def spec(self, model: nn.Module) -> ModelSpec:
        names, core, cfg = ModuleNames(model), model.model, model.config
        parts = describe_vision_tower(names, core.vision_tower)
        layers = resolve_feature_layers(cfg.vision_feature_layer, parts.num_hidden_states)
        proj = core.multi_modal_projector
        writers = linear_writers(names, proj.linear_2) + (names.param(core, "image_newline", -1),)
        return ModelSpec(
            family=self.family,
            vision=vision_tower_spec(parts, names, raw_readers=(proj.linear_1,)),
            projector=mlp_projector_spec(names, proj),
            language=decoder_tower_spec(names, core.language_model, model.lm_head, writers),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="rope1d",
            extra={"vision_feature_layers": layers,
                   "vision_feature_select_strategy": cfg.vision_feature_select_strategy},
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id), int(model.config.video_token_id))
