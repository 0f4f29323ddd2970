"""The adapter interface: the only place that knows a model family's module names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.spec import ModelSpec
from mquant.models.validation import validate_spec


class ModelAdapter(ABC):
    """One subclass per family, registered by transformers class name and config `model_type`.

    `spec(model)` returns typed references to the model's own modules; `validate(model)` builds the
    spec and checks it, raising UnsupportedModelError with the failing path instead of letting an
    algorithm fall back silently.
    """

    family: ClassVar[str]
    class_names: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]]
    # A causal LM without vision (models/causal_lm.py): loaded with AutoModelForCausalLM, its spec
    # has no vision tower or projector.
    text_only: ClassVar[bool] = False

    @abstractmethod
    def spec(self, model: nn.Module) -> ModelSpec:
        """Typed structure of `model` (module objects, not names to look up)."""

    def validate(self, model: nn.Module) -> ModelSpec:
        try:
            spec = self.spec(model)
        except (AttributeError, IndexError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not match the {self.family} adapter ({exc}); "
                "the transformers version may have renamed a module — report it with `mquant info`"
            ) from exc
        validate_spec(spec)
        return spec

    def visual_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask [batch, seq]: True where a position holds a visual (image/video) token."""
        ids = torch.tensor(self.spec_token_ids(model), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return self.spec(model).image_token_ids
