"""Where each recipe step plugs into `quantize`.

- float steps edit float weights before the linears are wrapped (LayerNorm→RMSNorm, rotation);
- online steps configure the wrapped QuantLinears (online Hadamard);
- pre-quantization hooks run per block after its statistics pass (SmoothQuant, RMS);
- post steps change how the quantized model runs (AIFS).
Each step module registers itself here, so `quantize` never names an algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from ..config import STEP_ORDER, Recipe
from ..errors import ConfigError


@dataclass(frozen=True)
class Step:
    name: str
    stage: str  # "float" | "online" | "pre_quant" | "post"
    run: Callable


_STEPS: dict[str, Step] = {}
_STEP_MODULES = {
    "smoothquant": "mquant.quant.smoothquant",
    "ln_to_rms": "mquant.transforms.ln_to_rms",
    "rotate": "mquant.transforms.rotation",
    "online_hadamard": "mquant.transforms.online",
    "rms": "mquant.transforms.rms",
    "msq": None,  # modality-specific scales are built into the calibrator and QuantLinear
    "aifs": "mquant.transforms.aifs",
}


def register_step(name: str, stage: str):
    def wrap(fn: Callable) -> Callable:
        _STEPS[name] = Step(name, stage, fn)
        return fn

    return wrap


def steps_for(recipe: Recipe, stage: str) -> list[Step]:
    out = []
    for name in recipe.steps:
        module = _STEP_MODULES[name]
        if module is None:
            continue
        if name not in _STEPS:
            try:
                import_module(module)
            except ModuleNotFoundError as exc:
                raise ConfigError(f"recipe step '{name}' is not available in this build ({exc.name}); remove it from the recipe") from exc
        step = _STEPS[name]
        if step.stage == stage:
            out.append(step)
    return sorted(out, key=lambda s: STEP_ORDER.index(s.name))
