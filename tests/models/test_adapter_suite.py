"""The checks every model adapter must pass, run on a tiny random instance of each family's real
transformers class. Family-specific structure lives in the small test_<family>.py files.

The families are derived, not listed: every tiny family (`EQUIVALENCE_FAMILIES`: `TINY_FAMILIES`
plus variants such as llava_dinov2 and smolvlm) and every `model_type` a registered adapter claims.
A new family that registers an adapter and a tiny factory gets the whole suite; an adapter whose
model_type has no tiny factory fails here, naming what is missing (it is not skipped).
"""

import dataclasses
import functools
import re

import pytest
import torch

from mquant.models import registry
from mquant.models.glm4v import Glm4vAdapter
from mquant.models.idefics3 import Idefics3Adapter
from mquant.models.internvl import InternVLAdapter
from mquant.models.llava import LlavaAdapter
from mquant.models.llava_onevision import LlavaOnevisionAdapter
from mquant.models.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from mquant.models.qwen3_vl import Qwen3VLAdapter
from mquant.models.registry import (
    adapter_for_model_type,
    get_adapter,
    supported_model_types,
)
from mquant.testing.equivalence import EQUIVALENCE_FAMILIES
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import TinyCase, tiny_case


def registered_families() -> tuple[str, ...]:
    """Every tiny family, then every registered model_type that is not one (those fail below)."""
    return EQUIVALENCE_FAMILIES + tuple(t for t in supported_model_types() if t not in EQUIVALENCE_FAMILIES)


FAMILIES = registered_families()
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BATCHES = {
    "plain": {},
    "padded": {"padding": True},
    "padded_text_row": {"padding": True, "text_only_row": True, "batch_size": 3},
}
# The adapter class each built-in family must resolve to (a new family is checked by the generic
# class-name / model_type agreement alone).
BUILTIN_ADAPTERS = {
    "llava": LlavaAdapter, "llava_dinov2": LlavaAdapter, "llava_onevision": LlavaOnevisionAdapter,
    "idefics3": Idefics3Adapter, "smolvlm": Idefics3Adapter, "internvl": InternVLAdapter,
    "qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter, "qwen3_vl": Qwen3VLAdapter, "glm4v": Glm4vAdapter,
}  # fmt: skip
# Visual tokens per image of the built-in families whose tiny images all have one size (a new such
# family is only checked for the same count in every image row).
IMAGE_TOKENS = {
    "llava": 16, "llava_dinov2": 16,  # 4x4 patches, CLS dropped ("default")
    "idefics3": 9, "smolvlm": 9,  # 6x6 patches, pixel shuffle 2
    "internvl": 16,  # 8x8 patches, pixel shuffle 2
    "llava_onevision": 36,  # 16 base-view tokens + 4 grid rows of (4 tokens + 1 newline)
}  # fmt: skip


def build_tiny(family: str, dtype: torch.dtype = torch.float32) -> TinyCase:
    """A fresh tiny case, or a test failure that names the missing factory."""
    try:
        return tiny_case(family, dtype=dtype)
    except (ModuleNotFoundError, KeyError) as exc:
        claimed = [type(adapter_for_model_type(family)).__name__] if family in supported_model_types() else []
        pytest.fail(
            f"family '{family}' {'(model_type of ' + claimed[0] + ') ' if claimed else ''}has no tiny factory: "
            f"add mquant/testing/tiny/{family}.py with @register_tiny('{family}') ({type(exc).__name__}: {exc})",
            pytrace=False,
        )


@functools.cache
def shared_case(family: str, dtype: torch.dtype = torch.float32) -> TinyCase:
    """One tiny case per (family, dtype) for the tests that do not modify the model. Float64 cases
    run their language model with SDPA: transformers' eager decoder attention takes its softmax in
    float32, where the float64 mask minimum is -inf, so fully masked left-padding rows turn NaN (the
    LLaVA-style factories build the text model with SDPA for the same reason)."""
    case = build_tiny(family, dtype)
    if dtype == torch.float64:
        get_adapter(case.model).validate(case.model).language.module.set_attn_implementation("sdpa")
    return case


def forward_checkable(model) -> object:
    """The model's adapter, as `check_spec_against_forward` can check it: a spec that declares
    `vision.writers_after_input_norm` (GLM-4V's position table) adds them to the input norm's output,
    so block 0 does not read the norm output itself; its family test checks that stream start."""
    adapter = get_adapter(model)
    vision = adapter.validate(model).vision
    if vision is None or not vision.writers_after_input_norm:
        return adapter

    class InputNormChecked(type(adapter)):
        def spec(self, model):
            spec = super().spec(model)
            return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, input_norm=None))

    return InputNormChecked()


def single_row(model, batch: dict, row: int) -> dict:
    """Row `row` of a tiny batch on its own, padding removed. Tiny batches hold one image per image
    row, in row order: per-position tensors [batch, seq] are cut to the row, per-row tensors
    (leading axis = batch size) to the row, per-image tensors to the row's image, and M-RoPE flat
    patch lists to the row's image by `image_grid_thw`. A text-only row keeps no image input."""
    ids = batch["input_ids"]
    keep = batch["attention_mask"][row].bool()
    has_image = get_adapter(model).visual_token_mask(model, ids).any(dim=1)
    image, n_images = int(has_image[:row].sum()), int(has_image.sum())
    out = {}
    for key, value in batch.items():
        if value.shape == ids.shape:
            out[key] = value[row : row + 1, keep]
        elif not has_image[row]:
            continue
        elif key == "pixel_values" and "image_grid_thw" in batch:
            sizes = batch["image_grid_thw"].prod(dim=1)
            start = int(sizes[:image].sum())
            out[key] = value[start : start + int(sizes[image])]
        elif value.shape[0] == ids.shape[0]:
            out[key] = value[row : row + 1]
        elif value.shape[0] == n_images:
            out[key] = value[image : image + 1]
        else:
            raise AssertionError(f"single_row does not know how to cut batch['{key}'] {tuple(value.shape)}")
    return out


def test_every_registered_adapter_has_a_tiny_factory():
    assert set(BUILTIN_ADAPTERS) <= set(FAMILIES)
    missing = []
    for model_type in supported_model_types():
        try:
            shared_case(model_type)
        except pytest.fail.Exception as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing)


def test_a_new_adapter_without_a_tiny_factory_fails_loudly(monkeypatch):
    class NewAdapter(LlavaAdapter):
        family = "unbuilt_vlm"
        class_names = ("UnbuiltVlmForConditionalGeneration",)
        model_types = ("unbuilt_vlm",)

    registry.supported_model_types()  # load the built-in adapters before copying the list
    monkeypatch.setattr(registry, "_ADAPTERS", list(registry._ADAPTERS))
    registry.register(NewAdapter)
    assert registered_families()[-1] == "unbuilt_vlm"  # it gets the whole suite...
    with pytest.raises(pytest.fail.Exception, match=r"'unbuilt_vlm' \(model_type of NewAdapter\) has no tiny factory"):
        build_tiny("unbuilt_vlm")  # ...and fails it, naming the missing factory


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_resolves_by_class_and_model_type(family):
    case = shared_case(family)
    model_type = case.model.config.model_type
    adapter = get_adapter(case.model)
    assert case.family == family
    assert type(adapter_for_model_type(model_type)) is type(adapter)
    assert type(case.model).__name__ in adapter.class_names and model_type in adapter.model_types
    if family in supported_model_types():
        assert model_type == family
    if family in BUILTIN_ADAPTERS:
        assert isinstance(adapter, BUILTIN_ADAPTERS[family])
    adapter.validate(case.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_is_in_exactly_one_group(family):
    case = shared_case(family)
    spec = get_adapter(case.model).validate(case.model)
    lm_head = [case.model.lm_head]
    check_linear_coverage(spec, [case.model], exclude=lm_head)  # nothing outside the groups but lm_head
    parts = [t.module for t in spec.towers()] + ([spec.projector.module] if spec.projector is not None else [])
    check_linear_coverage(spec, parts, exclude=lm_head)
    # ... and the check names a projector linear (a causal LM: a block linear) the spec forgets.
    if spec.projector is not None:
        last = spec.projector.groups[-1]
        broken = dataclasses.replace(spec, projector=dataclasses.replace(spec.projector, groups=spec.projector.groups[:-1]))
    else:
        block = spec.language.blocks[-1]
        last = block.groups[-1]
        blocks = (*spec.language.blocks[:-1], dataclasses.replace(block, groups=block.groups[:-1]))
        broken = dataclasses.replace(spec, language=dataclasses.replace(spec.language, blocks=blocks))
    with pytest.raises(AssertionError, match=re.escape(last.linears[0].name)):
        check_linear_coverage(broken, [case.model], exclude=lm_head)


@pytest.mark.parametrize("kwargs", BATCHES.values(), ids=BATCHES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_spec_matches_forward_dataflow(family, dtype, kwargs):
    case = shared_case(family, dtype)
    batch = case.batch(**kwargs)
    text_only = get_adapter(case.model).validate(case.model).text_only
    assert ("pixel_values" not in batch) if text_only else batch["pixel_values"].dtype == dtype
    check_spec_against_forward(case.model, forward_checkable(case.model), batch)


@pytest.mark.parametrize("kwargs", BATCHES.values(), ids=BATCHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_visual_token_mask_counts_the_image_tokens(family, kwargs):
    case = shared_case(family)
    batch = case.batch(**kwargs)
    mask = get_adapter(case.model).visual_token_mask(case.model, batch["input_ids"])
    has_image = mask.any(dim=1)
    assert mask.shape == batch["input_ids"].shape
    if get_adapter(case.model).validate(case.model).text_only:  # a causal LM: no visual position at all
        assert not mask.any()
        return
    assert has_image.tolist() == [not (kwargs.get("text_only_row") and row == len(mask) - 1) for row in range(len(mask))]
    if "image_grid_thw" in batch:  # M-RoPE families: one token per merged merge x merge unit of patches
        merge = case.model.config.vision_config.spatial_merge_size
        expected = int(batch["image_grid_thw"].prod(dim=1).sum()) // merge**2
        assert int(mask.sum()) == expected == int((batch["mm_token_type_ids"] == 1).sum())
    else:  # one fixed-size image per image row; Idefics3 pads pixel_values with all-zero images
        pixel_mask = batch.get("pixel_attention_mask")
        n_images = int(pixel_mask.flatten(1).any(1).sum()) if pixel_mask is not None else batch["pixel_values"].shape[0]
        per_image = IMAGE_TOKENS.get(family, int(mask[0].sum()))
        assert int(mask.sum()) == per_image * n_images and (mask[has_image].sum(dim=1) == per_image).all()


@pytest.mark.parametrize("attn,padding", [("eager", False), ("sdpa", True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_mixed_batch_matches_rows_run_alone(family, attn, padding):
    # Padded float64 batches run with SDPA (see `shared_case`). 1-D RoPE families count positions
    # from the left edge, so left padding shifts them; their RoPE tables are float32, hence 1e-6.
    case = build_tiny(family, torch.float64)  # fresh: the attention implementation changes
    case.model.set_attn_implementation(attn)
    spec = get_adapter(case.model).validate(case.model)
    tol = 1e-6 if padding and spec.position_scheme != "mrope3d" else 1e-9
    batch = case.batch(padding=padding, text_only_row=True, batch_size=3)
    with torch.no_grad():
        logits = case.model(**batch).logits
        for row in range(3):  # image rows (left-padded when padding) and the text-only row
            alone = case.model(**single_row(case.model, batch, row)).logits[0]
            keep = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row, keep], alone, rtol=tol, atol=tol)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
