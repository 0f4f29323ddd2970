"""Frozen, typed, versioned configuration: what to quantize and how.

A `Recipe` is written into every saved model (`to_dict`) and read back with `from_dict`, which
refuses other versions instead of guessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .errors import ConfigError

RECIPE_VERSION = 1

WeightMethod = Literal["rtn", "gptq"]
Method = Literal["rtn", "gptq", "smoothquant", "quarot", "mquant"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "smoothquant", "quarot", "mquant")
OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse")
# Float-equivalent transforms and quantization steps, in the order they are applied.
STEP_ORDER: tuple[str, ...] = ("smoothquant", "ln_to_rms", "rotate", "online_hadamard", "rms", "msq", "aifs")
SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_ACT_BITS = (8,)


@dataclass(frozen=True)
class SchemeConfig:
    """Bit widths of one part of the model (vision tower + projector, or language model)."""

    weight_bits: int = 8
    act_bits: int | None = 8  # None: activations stay float (W4A16 / W8A16)
    group_size: int | None = None  # weight groups along the input dim; None: per output channel
    act_dynamic: bool = False  # per-token scales computed at run time instead of static ones

    def __post_init__(self) -> None:
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise ConfigError(f"unsupported weight bit width {self.weight_bits}; use one of {SUPPORTED_WEIGHT_BITS}")
        if self.act_bits is not None and self.act_bits not in SUPPORTED_ACT_BITS:
            raise ConfigError(f"unsupported activation bit width {self.act_bits}; use 8 or 16 (no activation quantization)")
        if self.group_size is not None and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise ConfigError(f"group size {self.group_size} must be a power of two >= 8, or omitted for per-channel")

    @property
    def name(self) -> str:
        act = "16" if self.act_bits is None else str(self.act_bits)
        return f"w{self.weight_bits}a{act}"

    @classmethod
    def parse(cls, scheme: str, act: str = "static", group_size: int | None = None) -> SchemeConfig:
        """'w4a8' / 'W8A16' → SchemeConfig. `act` is 'static' or 'dynamic'."""
        text = scheme.strip().lower()
        if not (text.startswith("w") and "a" in text):
            raise ConfigError(f"scheme '{scheme}' is not of the form wXaY (e.g. w8a8, w4a8, w4a16, w8a16)")
        w_text, a_text = text[1:].split("a", 1)
        if not (w_text.isdigit() and a_text.isdigit()):
            raise ConfigError(f"scheme '{scheme}' is not of the form wXaY (e.g. w8a8, w4a8, w4a16, w8a16)")
        if act not in ("static", "dynamic"):
            raise ConfigError(f"--act must be 'static' or 'dynamic', got '{act}'")
        a_bits = int(a_text)
        return cls(
            weight_bits=int(w_text),
            act_bits=None if a_bits == 16 else a_bits,
            group_size=group_size,
            act_dynamic=act == "dynamic",
        )


# QuantLinear, the kernels and saved models read column j's scale from group j // g.
SCATTERED_GROUPS_ERROR = (
    "GPTQ act_order with non-static groups scatters each group's columns (g_idx), which QuantLinear "
    "cannot store; use static groups (GPTQConfig(static_groups=True))"
)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ options; ``static_groups`` None means static groups exactly when ``act_order``.

    Static groups stay the act_order default: on the default model at W4 g128 non-static (g_idx)
    groups change the held-out output error by under 1% (BENCHMARKS.md, "GPTQ act-order: static
    vs non-static groups"), and only static groups keep the j // g layout the model path stores.
    """

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    clip_search: bool = False
    static_groups: bool | None = None

    @property
    def scatters_groups(self) -> bool:
        """True when per-group scales would need a per-column group index (g_idx)."""
        return self.act_order and self.static_groups is False


@dataclass(frozen=True)
class Recipe:
    """Everything `quantize` does to a model, in order.

    `steps` are applied in `STEP_ORDER`; `weight_method` quantizes the weights afterwards.
    """

    method: str = "rtn"
    vision: SchemeConfig = field(default_factory=SchemeConfig)
    language: SchemeConfig = field(default_factory=SchemeConfig)
    weight_method: str = "rtn"
    observer: str = "minmax"
    steps: tuple[str, ...] = ()
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    smoothquant_alpha: float = 0.5
    rms_threshold: float | None = None  # None: RMS on every online-rotated linear
    rotation_seed: int = 42
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        if self.weight_method not in ("rtn", "gptq"):
            raise ConfigError(f"unknown weight method '{self.weight_method}'; use rtn or gptq")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer '{self.observer}'; use one of {', '.join(OBSERVERS)}")
        if self.weight_method == "gptq" and self.gptq.scatters_groups and (self.vision.group_size or self.language.group_size):
            raise ConfigError(SCATTERED_GROUPS_ERROR)
        unknown = [s for s in self.steps if s not in STEP_ORDER]
        if unknown:
            raise ConfigError(f"unknown recipe step(s) {unknown}; known: {', '.join(STEP_ORDER)}")
        object.__setattr__(self, "steps", tuple(s for s in STEP_ORDER if s in self.steps))

    def has(self, step: str) -> bool:
        return step in self.steps

    def with_steps(self, *steps: str) -> Recipe:
        return replace(self, steps=tuple(steps))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = list(self.steps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        version = data.get("version")
        if version != RECIPE_VERSION:
            raise ConfigError(f"recipe version {version} is not supported by this mquant (expects {RECIPE_VERSION}); re-quantize with this version")
        fields = dict(data)
        fields["vision"] = SchemeConfig(**fields["vision"])
        fields["language"] = SchemeConfig(**fields["language"])
        fields["gptq"] = GPTQConfig(**fields["gptq"])
        fields["steps"] = tuple(fields["steps"])
        return cls(**fields)


# Transform steps each method uses; `mquant ablate` walks MQUANT_STEPS one at a time.
MQUANT_STEPS: tuple[str, ...] = ("msq", "aifs", "ln_to_rms", "rotate", "online_hadamard", "rms")
QUAROT_STEPS: tuple[str, ...] = ("ln_to_rms", "rotate", "online_hadamard")


def recipe_for(
    method: str,
    scheme: str = "w4a8",
    act: str | None = None,
    vision_scheme: str | None = None,
    group_size: int | None = None,
    observer: str = "minmax",
) -> Recipe:
    """The standard recipe of a method. QuaRot defaults to dynamic per-token activations as in its
    paper; every other method to static per-tensor scales."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    act = act or ("dynamic" if method == "quarot" else "static")
    language = SchemeConfig.parse(scheme, act, group_size)
    vision = SchemeConfig.parse(vision_scheme or scheme, act, group_size)
    steps = {"smoothquant": ("smoothquant",), "quarot": QUAROT_STEPS, "mquant": MQUANT_STEPS}.get(method, ())
    weight_method = "rtn" if method in ("rtn", "smoothquant") else "gptq"
    return Recipe(method=method, vision=vision, language=language, weight_method=weight_method, observer=observer, steps=steps)


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration samples come from: 'default' (easy-VQA train split, offline), a folder of
    images, a JSONL file of {"image", "prompt"} records, or a `datasets` name (online users)."""

    source: str = "default"
    n_samples: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ConfigError(f"--n-calib must be at least 1, got {self.n_samples}")
