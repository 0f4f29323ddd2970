"""The adapter interface: the only place that knows a model family's module names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.spec import BlockSpec, LinearRef, ModelSpec, NormRef, TowerSpec


class ModelAdapter(ABC):
    """One subclass per family, registered by transformers class name and config `model_type`.

    `spec(model)` returns typed references to the model's own modules; `validate(model)` builds the
    spec and checks it, raising UnsupportedModelError with the failing path instead of letting an
    algorithm fall back silently.
    """

    family: ClassVar[str]
    class_names: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]]

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


def _check_linear(ref: LinearRef, where: str) -> None:
    if not isinstance(ref.module, nn.Linear):  # QuantLinear subclasses nn.Linear
        raise UnsupportedModelError(f"{where}: {ref.name} is {type(ref.module).__name__}, expected Linear")


def _check_norm(norm: NormRef, hidden: int, where: str) -> None:
    weight = getattr(norm.module, "weight", None)
    if weight is not None and weight.shape[-1] != hidden:
        raise UnsupportedModelError(f"{where}: norm {norm.name} has width {weight.shape[-1]}, expected {hidden}")
    for ref in norm.feeds:
        _check_linear(ref, where)
        if ref.module.in_features % hidden:
            raise UnsupportedModelError(f"{where}: {ref.name} reads {ref.module.in_features} features, norm gives {hidden}")


def _check_block(block: BlockSpec, hidden: int, where: str) -> None:
    if not block.groups:
        raise UnsupportedModelError(f"{where}: block {block.name} has no linear groups")
    for ref in block.linears():
        _check_linear(ref, where)
    for norm in block.norms:
        _check_norm(norm, hidden, where)
    for ref in block.residual_writers:
        if ref.module.out_features != hidden:
            raise UnsupportedModelError(f"{where}: residual writer {ref.name} writes {ref.module.out_features}, expected {hidden}")
    att = block.attention
    if att.num_heads * att.head_dim != _rows(att.q):
        raise UnsupportedModelError(f"{where}: {att.q.name} has {_rows(att.q)} rows, expected heads*head_dim")


def _rows(ref: LinearRef) -> int:
    if ref.rows is None:
        return ref.module.out_features
    return len(range(*ref.rows.indices(ref.module.out_features)))


def validate_tower(tower: TowerSpec) -> None:
    where = f"{tower.modality} tower {tower.name}"
    if not tower.blocks:
        raise UnsupportedModelError(f"{where}: no blocks found")
    for block in tower.blocks:
        _check_block(block, tower.hidden_size, where)
    if tower.final_norm is not None:
        _check_norm(tower.final_norm, tower.hidden_size, where)


def validate_spec(spec: ModelSpec) -> None:
    validate_tower(spec.vision)
    validate_tower(spec.language)
    if not spec.projector.linears():
        raise UnsupportedModelError(f"{spec.family}: projector {spec.projector.name} has no linear layers")
    names = [ref.name for _, ref in spec.all_linears()]
    if len(names) != len(set(names)) and not _fused_only_duplicates(spec):
        raise UnsupportedModelError(f"{spec.family}: a linear layer appears in two groups")
    if not spec.image_token_ids:
        raise UnsupportedModelError(f"{spec.family}: no image token id in the config")


def _fused_only_duplicates(spec: ModelSpec) -> bool:
    """A fused qkv linear may be referenced by q/k/v row slices in the attention spec, but groups
    must list each module once."""
    seen: set[int] = set()
    for _, ref in spec.all_linears():
        if id(ref.module) in seen:
            return False
        seen.add(id(ref.module))
    return True
