"""Text-only causal LMs of the families whose language models the VLM adapters already describe:
`LlamaForCausalLM` (e.g. SmolLM2), `Qwen2ForCausalLM`, `Qwen3ForCausalLM` (per-head q/k norms).

`model.model` is the decoder (`embed_tokens`, `layers`, `norm`) and `lm_head` reads its final norm:
exactly the language tower of LLaVA / Qwen2-VL / Qwen3-VL, built by the same `decoder_tower`. The
spec has no vision tower, projector or image tokens (`ModelSpec.text_only`): quantization runs
the language half of the pipeline on text-only calibration samples.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from mquant.models.base import ModelAdapter
from mquant.models.blocks import decoder_block, decoder_tower
from mquant.models.naming import ModuleNames
from mquant.models.registry import register
from mquant.models.spec import ModelSpec


class CausalLMAdapter(ModelAdapter):
    text_only = True
    qk_norms: ClassVar[bool] = False

    def spec(self, model: nn.Module) -> ModelSpec:
        names, lm = ModuleNames(model), model.model
        blocks = tuple(decoder_block(names, layer, qk_norms=self.qk_norms) for layer in lm.layers)
        return ModelSpec(
            family=self.family, vision=None, projector=None,
            language=decoder_tower(names, lm, model.lm_head, blocks=blocks),
            image_token_ids=(), position_scheme="rope1d",
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return ()


@register
class LlamaAdapter(CausalLMAdapter):
    family = "llama"
    class_names = ("LlamaForCausalLM",)
    model_types = ("llama",)


@register
class Qwen2Adapter(CausalLMAdapter):
    family = "qwen2"
    class_names = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)


@register
class Qwen3Adapter(CausalLMAdapter):
    family = "qwen3"
    class_names = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    qk_norms = True
