"""THE decision "is this module a LayerNorm or an RMSNorm?", and the eps it normalizes with.

Every adapter (through `ModuleNames.norm`), step and test helper asks `norm_kind`; nothing else
inspects norm classes. The kind decides what a transform may do: a LayerNorm subtracts the mean
(centring or a mean-preserving rotation keeps it exact), an RMSNorm commutes with any rotation.

Rules, in order:
- `nn.LayerNorm` and its subclasses (mquant's ProjectedLayerNorm) → "layernorm", eps `.eps`;
- `nn.RMSNorm`, or a class whose name ends in "RMSNorm" (LlamaRMSNorm, Qwen2RMSNorm, Glm4vRMSNorm,
  InternVLVisionRMSNorm, mquant's UnifiedRMSNorm / ProjectedRMSNorm, ...) → "rmsnorm";
- a module with transformers' `variance_epsilon` and no `bias` (T5-style RMS norms with another
  name) → "rmsnorm"; with a bias it is a mean-subtracting LayerNorm of the old BertLayerNorm kind,
  which is not supported;
- anything else is not a norm (None).
An RMSNorm's eps is `.variance_epsilon` (transformers) or `.eps` (torch); `nn.RMSNorm(eps=None)`
uses the dtype's machine epsilon, which a fold cannot reproduce exactly, so it is refused.
"""

from __future__ import annotations

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.spec import NormKind


def norm_kind(module: nn.Module) -> NormKind | None:
    """"layernorm", "rmsnorm", or None when `module` is neither."""
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm"):
        return "rmsnorm"
    if hasattr(module, "variance_epsilon") and not hasattr(module, "bias"):
        return "rmsnorm"
    return None


def describe_norm(module: nn.Module, name: str) -> tuple[NormKind, float]:
    """(kind, eps) of a norm module; `name` (its qualified name) is for the error message."""
    kind = norm_kind(module)
    if kind is None:
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) is neither a LayerNorm nor an RMSNorm")
    eps = module.eps if kind == "layernorm" else getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if eps is None:
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) has no explicit eps; set one in the config")
    return kind, float(eps)
