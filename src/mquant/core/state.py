"""`QuantState`: everything a quantized (or transformed) model carries besides its modules, as one
object installed in one place.

- `recipe`: what `quantize` did (None for a model that was only transformed);
- `ctx`: the modality context every language QuantLinear reads (MSQ), kept in sync with each
  forward's `input_ids` by a pre-hook on the model;
- `structure`: the JSON-able record of structural transforms (norm swaps, untied embeddings)
  that `load_quantized` replays before restoring the weights.

`quantize`, `load_quantized`, calibration checkpoints and the equivalence helpers all go through
`QuantState.install(model)`; everything else reads it with `QuantState.of(model)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from mquant.core.modality import ModalityContext, attach_modality_hook

if TYPE_CHECKING:  # typing only: config sits below core, but the annotation needs no import at run time
    from mquant.config import Recipe

_ATTR = "_mquant_state"


@dataclass
class QuantState:
    recipe: Recipe | None = None
    ctx: ModalityContext = field(default_factory=ModalityContext)
    structure: dict[str, Any] = field(default_factory=dict)
    image_token_ids: tuple[int, ...] = ()
    _hook: Any = field(default=None, repr=False)

    def install(self, model: nn.Module) -> QuantState:
        """Attach to `model` (replacing any state it had): the modality hook starts tracking."""
        old = QuantState.of(model)
        if old is not None and old is not self:
            old.detach_hook()
        self.detach_hook()
        msq = self.recipe.step("msq") if self.recipe is not None else None
        self.ctx.first_token = bool(getattr(msq, "first_token", False))
        if self.image_token_ids:
            self._hook = attach_modality_hook(model, self.ctx, self.image_token_ids)
        setattr(model, _ATTR, self)
        return self

    def detach_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def track_modality(self, model: nn.Module, image_token_ids: tuple[int, ...]) -> None:
        """Start (or restart) keeping `ctx.visual_mask` in sync with `model`'s forward calls."""
        self.image_token_ids = tuple(image_token_ids)
        self.install(model)

    @staticmethod
    def of(model: nn.Module) -> QuantState | None:
        state = getattr(model, _ATTR, None)
        return state if isinstance(state, QuantState) else None

    @staticmethod
    def ensure(model: nn.Module) -> QuantState:
        """The installed state, or a fresh empty one installed now (a float model being transformed)."""
        return QuantState.of(model) or QuantState().install(model)

    def record_structure(self, name: str, description: Any) -> None:
        self.structure = {**self.structure, name: description}


def modality_context(model: nn.Module) -> ModalityContext | None:
    state = QuantState.of(model)
    return None if state is None else state.ctx
