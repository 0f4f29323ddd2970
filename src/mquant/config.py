"""Frozen, typed, versioned configuration: what to quantize and how.

A `Recipe` is written into every saved model (`to_dict`) and read back with `from_dict`, which
refuses unknown versions instead of guessing (version 1, the flat layout before step configs,
is still read: models saved then keep loading).

Each recipe step (an algorithm in `mquant.steps`) owns one frozen config class here, registered
by its `name`; `order` fixes where it runs relative to the others. Adding a step = its config
class below + its module in `mquant/steps/` + one line in `mquant.steps.STEPS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

from .errors import ConfigError

RECIPE_VERSION = 2
READABLE_RECIPE_VERSIONS = (1, 2)

Method = Literal["rtn", "gptq", "smoothquant", "quarot", "mquant"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "smoothquant", "quarot", "mquant")
OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse", "auto")  # auto: chosen per layer on the validation split
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


# ---- weight quantizers ------------------------------------------------------------------------
@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest weights; `clip_search` picks each scale's clip ratio by MSE."""

    method: ClassVar[str] = "rtn"
    clip_search: bool = False


# QuantLinear, the kernels and saved models read column j's scale from group j // g.
SCATTERED_GROUPS_ERROR = (
    "GPTQ act_order with non-static groups scatters each group's columns (g_idx), which QuantLinear "
    "cannot store; use static groups (GPTQConfig(static_groups=True))"
)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ weights (quantizers/gptq.py documents each choice); ``static_groups`` None means static
    groups exactly when ``act_order``.

    Static groups stay the act_order default: on the default model at W4 g128 non-static (g_idx)
    groups change the held-out output error by under 1% (BENCHMARKS.md, "GPTQ act-order: static
    vs non-static groups"), and only static groups keep the j // g layout the model path stores.
    """

    method: ClassVar[str] = "gptq"
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    clip_search: bool = False
    static_groups: bool | None = None

    @property
    def scatters_groups(self) -> bool:
        """True when per-group scales would need a per-column group index (g_idx)."""
        return self.act_order and self.static_groups is False


WeightConfig = RTNConfig | GPTQConfig
_WEIGHT_CONFIGS: dict[str, type] = {"rtn": RTNConfig, "gptq": GPTQConfig}


def weight_config(method: str, **options: Any) -> WeightConfig:
    if method not in _WEIGHT_CONFIGS:
        raise ConfigError(f"unknown weight method '{method}'; use rtn or gptq")
    cls = _WEIGHT_CONFIGS[method]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in known})


# ---- recipe steps -----------------------------------------------------------------------------
class StepConfig:
    """Base of every step's config: a frozen dataclass with a registered `name` and an `order`."""

    name: ClassVar[str]
    order: ClassVar[int]
    _registry: ClassVar[dict[str, type[StepConfig]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        StepConfig._registry[cls.name] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]

    @staticmethod
    def names() -> tuple[str, ...]:
        """Every registered step, in the order the steps run."""
        return tuple(sorted(StepConfig._registry, key=lambda n: StepConfig._registry[n].order))

    @staticmethod
    def named(name: str, **params: Any) -> StepConfig:
        cls = StepConfig._registry.get(name)
        if cls is None:
            raise ConfigError(f"unknown recipe step '{name}'; known: {', '.join(StepConfig.names())}")
        try:
            return cls(**params)
        except TypeError as exc:
            raise ConfigError(f"recipe step '{name}': {exc}; its options are {[f.name for f in fields(cls)]}") from exc

    @staticmethod
    def from_dict(data: dict[str, Any]) -> StepConfig:
        params = dict(data)
        return StepConfig.named(params.pop("name", None), **params)


@dataclass(frozen=True)
class SmoothQuantConfig(StepConfig):
    """SmoothQuant: migrate activation range into weights, s = max|x|^α / max|W|^(1-α)."""

    name: ClassVar[str] = "smoothquant"
    order: ClassVar[int] = 0
    alpha: float = 0.5


@dataclass(frozen=True)
class LnToRmsConfig(StepConfig):
    """LayerNorm → RMSNorm unification (MQUANT.md §3)."""

    name: ClassVar[str] = "ln_to_rms"
    order: ClassVar[int] = 1


@dataclass(frozen=True)
class RotateConfig(StepConfig):
    """Hadamard rotation of the residual streams folded into the weights; `seed` draws its signs."""

    name: ClassVar[str] = "rotate"
    order: ClassVar[int] = 2
    seed: int = 42


@dataclass(frozen=True)
class OnlineHadamardConfig(StepConfig):
    """Run-time Hadamard before down_proj / fc2, compensated in the weight."""

    name: ClassVar[str] = "online_hadamard"
    order: ClassVar[int] = 3


@dataclass(frozen=True)
class RMSConfig(StepConfig):
    """Rotation magnitude suppression; `threshold` on the outlier ratio, None: every rotated linear."""

    name: ClassVar[str] = "rms"
    order: ClassVar[int] = 4
    threshold: float | None = None


@dataclass(frozen=True)
class MSQConfig(StepConfig):
    """Modality-specific static scales: one [text, visual] pair per language activation point.

    `first_token`: a third static scale, [text, visual, first], for each prompt's first token. That
    token is the attention sink: causal attention makes its activations the same for every prompt,
    and in some layers they are 100-200x every other token's (default model: layer 11's down_proj
    input, 110 vs a median 0.55), so inside the text range they leave the text tokens ~1 int8
    level (easy-vqa-ood, BENCHMARKS.md). The choice is by position (the first attended token of
    a prefill), fixed ahead of time like the modality split: still fully static."""

    name: ClassVar[str] = "msq"
    order: ClassVar[int] = 5
    first_token: bool = False


@dataclass(frozen=True)
class AIFSConfig(StepConfig):
    """Attention-invariant flexible switching: visual then text rows, one block each (run time)."""

    name: ClassVar[str] = "aifs"
    order: ClassVar[int] = 6


def _as_step(step: StepConfig | str) -> StepConfig:
    if isinstance(step, StepConfig):
        return step
    if isinstance(step, str):
        return StepConfig.named(step)
    raise ConfigError(f"recipe steps are StepConfig objects or step names, got {type(step).__name__}")


@dataclass(frozen=True)
class Recipe:
    """Everything `quantize` does to a model: `steps` (run in their configs' order), then the
    weight quantizer `weights` with the `vision` / `language` schemes."""

    method: str = "rtn"
    vision: SchemeConfig = field(default_factory=SchemeConfig)
    language: SchemeConfig = field(default_factory=SchemeConfig)
    weights: WeightConfig = field(default_factory=RTNConfig)
    observer: str = "minmax"
    steps: tuple[StepConfig, ...] = ()
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        if not isinstance(self.weights, (RTNConfig, GPTQConfig)):
            raise ConfigError(f"weights must be RTNConfig or GPTQConfig, got {type(self.weights).__name__}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer '{self.observer}'; use one of {', '.join(OBSERVERS)}")
        if isinstance(self.weights, GPTQConfig) and self.weights.scatters_groups and (self.vision.group_size or self.language.group_size):
            raise ConfigError(SCATTERED_GROUPS_ERROR)
        steps = [_as_step(s) for s in self.steps]
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ConfigError(f"recipe lists a step twice: {names}; keep one of each")
        object.__setattr__(self, "steps", tuple(sorted(steps, key=lambda s: s.order)))

    @property
    def weight_method(self) -> str:
        return self.weights.method

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def has(self, step: str) -> bool:
        return step in self.step_names

    def step(self, name: str) -> StepConfig | None:
        return next((s for s in self.steps if s.name == name), None)

    def with_steps(self, *steps: StepConfig | str) -> Recipe:
        """This recipe with exactly `steps`; a step named by string keeps this recipe's options."""
        return replace(self, steps=tuple(self.step(s) or s if isinstance(s, str) else s for s in steps))

    def without(self, name: str) -> Recipe:
        return replace(self, steps=tuple(s for s in self.steps if s.name != name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "vision": asdict(self.vision),
            "language": asdict(self.language),
            "weights": {"method": self.weights.method, **asdict(self.weights)},
            "observer": self.observer,
            "steps": [s.to_dict() for s in self.steps],
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        version = data.get("version")
        if version not in READABLE_RECIPE_VERSIONS:
            raise ConfigError(f"recipe version {version} is not supported by this mquant (reads {READABLE_RECIPE_VERSIONS}); re-quantize with this version")
        if version == 1:
            data = _upgrade_v1(data)
        weights = dict(data["weights"])
        return cls(
            method=data["method"],
            vision=SchemeConfig(**data["vision"]),
            language=SchemeConfig(**data["language"]),
            weights=weight_config(weights.pop("method"), **weights),
            observer=data["observer"],
            steps=tuple(StepConfig.from_dict(s) for s in data["steps"]),
        )


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept step options flat in the recipe and RTN read `gptq.clip_search`."""
    params = {"smoothquant": {"alpha": data.get("smoothquant_alpha", 0.5)},
              "rms": {"threshold": data.get("rms_threshold")},
              "rotate": {"seed": data.get("rotation_seed", 42)}}
    gptq = dict(data.get("gptq") or {})
    method = data.get("weight_method", "rtn")
    weights = {"method": method, **gptq} if method == "gptq" else {"method": "rtn", "clip_search": gptq.get("clip_search", False)}
    steps = [{"name": name, **params.get(name, {})} for name in data.get("steps", [])]
    return {**data, "weights": weights, "steps": steps, "version": RECIPE_VERSION}


# Transform steps each method uses; `mquant ablate` walks MQUANT_STEPS one at a time.
MQUANT_STEPS: tuple[str, ...] = ("msq", "aifs", "ln_to_rms", "rotate", "online_hadamard", "rms")
QUAROT_STEPS: tuple[str, ...] = ("ln_to_rms", "rotate", "online_hadamard")


def recipe_for(
    method: str,
    scheme: str = "w4a8",
    act: str | None = None,
    vision_scheme: str | None = None,
    group_size: int | None = None,
    observer: str | None = None,
    first_token: bool | None = None,
) -> Recipe:
    """The standard recipe of a method. QuaRot defaults to dynamic per-token activations as in its
    paper; every other method to static per-tensor scales. MQuant static defaults to MSQ's
    first-token scale and MSE-optimal clipping (`first_token` / `observer` None): together they hold
    the easy-vqa-ood targets (BENCHMARKS.md, "The default: first-token scale + MSE clipping");
    every other method to min-max."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    act = act or ("dynamic" if method == "quarot" else "static")
    language = SchemeConfig.parse(scheme, act, group_size)
    vision = SchemeConfig.parse(vision_scheme or scheme, act, group_size)
    steps = {"smoothquant": ("smoothquant",), "quarot": QUAROT_STEPS, "mquant": MQUANT_STEPS}.get(method, ())
    weights = RTNConfig() if method in ("rtn", "smoothquant") else GPTQConfig()
    mquant_static = "msq" in steps and act == "static"
    observer = observer or ("mse" if mquant_static else "minmax")
    if first_token is None:
        first_token = mquant_static
    if first_token:
        if not mquant_static:
            raise ConfigError("--first-token-scale is an MSQ static-scale option; use it with --method mquant --act static")
        steps = tuple(MSQConfig(first_token=True) if s == "msq" else s for s in steps)
    return Recipe(method=method, vision=vision, language=language, weights=weights, observer=observer, steps=steps)


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration samples come from: 'default' (easy-VQA train split, offline), a folder of
    images, a JSONL file of {"image", "prompt"} records, or a `datasets` name (online users).

    Robustness options (each an `mquant ablate --rows calib` row, measured on easy-vqa-ood):
    `prompts="diverse"` re-words each train question with calibration-only templates or swaps it
    for a free-form instruction; `text_fraction` of the samples are text-only chat turns (bundled
    prose) so text scales see text that is not about an image; `decode_tokens` greedy tokens of
    the float model are appended to every sample, so the text scales (MSQ) see decode steps too;
    `n_validation` further samples are held out: not observed, only run through each quantized
    block to measure how often activations leave their static range (report.json)."""

    source: str = "default"
    n_samples: int = 32
    seed: int = 0
    prompts: str = "train"
    text_fraction: float = 0.0
    decode_tokens: int = 0
    n_validation: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ConfigError(f"--n-calib must be at least 1, got {self.n_samples}")
        if self.prompts not in CALIB_PROMPTS:
            raise ConfigError(f"calibration prompts must be one of {', '.join(CALIB_PROMPTS)}, got '{self.prompts}'")
        if not 0.0 <= self.text_fraction < 1.0:
            raise ConfigError(f"text_fraction must be in [0, 1), got {self.text_fraction}")
        if self.decode_tokens < 0 or self.n_validation < 0:
            raise ConfigError(f"decode_tokens and n_validation must be >= 0, got {self.decode_tokens}, {self.n_validation}")


CALIB_PROMPTS = ("train", "diverse")
