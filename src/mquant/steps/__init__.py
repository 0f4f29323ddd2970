"""Recipe steps: one module per algorithm, each a `Step` (steps/base.py) owning one config.

`STEPS` maps each config type to its step class; `build_steps(recipe)` instantiates the recipe's
steps in order. To add an algorithm: its config in mquant/config.py, its module here with a
`Step` subclass, one line in `STEPS`, and a test folder.
"""

from __future__ import annotations

from mquant.config import Recipe, StepConfig
from mquant.errors import ConfigError
from mquant.steps.aifs import AIFS
from mquant.steps.base import Step
from mquant.steps.ln_to_rms import LnToRms
from mquant.steps.msq import MSQ
from mquant.steps.online_hadamard import OnlineHadamard
from mquant.steps.rms import RMS
from mquant.steps.rotate import Rotate
from mquant.steps.smoothquant import SmoothQuant
from mquant.steps.structure import apply_structure

STEPS: dict[type[StepConfig], type[Step]] = {
    cls.config_type: cls for cls in (SmoothQuant, LnToRms, Rotate, OnlineHadamard, RMS, MSQ, AIFS)
}


def build_steps(recipe: Recipe) -> list[Step]:
    """The recipe's steps as objects, in the order they run."""
    out = []
    for config in recipe.steps:
        cls = STEPS.get(type(config))
        if cls is None:
            raise ConfigError(f"recipe step '{config.name}' has no implementation in mquant.steps; remove it from the recipe")
        out.append(cls(config))
    return out


__all__ = ["STEPS", "Step", "apply_structure", "build_steps"]
