"""`validate()` refuses specs whose typed conventions contradict the model (one deliberate mistake
each, on the real spec of a tiny model), and `norm_kind` is the one norm detector's rule set."""

import dataclasses

import pytest
import torch
from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.norm_kind import describe_norm, norm_kind
from mquant.models.registry import get_adapter
from mquant.models.spec import WindowAttention
from mquant.steps.norms import ProjectedLayerNorm, ProjectedRMSNorm, UnifiedRMSNorm
from mquant.testing.spec_checks import check_spec_against_forward
from mquant.testing.tiny import tiny_case


def _edited(model, edit):
    """The model's own adapter, with `edit` applied to the spec before validation."""
    base = type(get_adapter(model))

    class Edited(base):
        def spec(self, m):
            return edit(super().spec(m))

    return Edited()


def _vision(**fields):
    return lambda s: dataclasses.replace(s, vision=dataclasses.replace(s.vision, **fields))


def _projector(**fields):
    return lambda s: dataclasses.replace(s, projector=dataclasses.replace(s.projector, **fields))


def _tap(**fields):
    def edit(s):
        taps = (dataclasses.replace(s.projector.deepstack[0], **fields),) + s.projector.deepstack[1:]
        return dataclasses.replace(s, projector=dataclasses.replace(s.projector, deepstack=taps))
    return edit


def _only_q_norm(s):
    block = s.language.blocks[0]
    blocks = (dataclasses.replace(block, attention=dataclasses.replace(block.attention, k_norm=None)),)
    return dataclasses.replace(s, language=dataclasses.replace(s.language, blocks=blocks + s.language.blocks[1:]))


def _foreign_after_norm_writer(s):
    return _vision(writers_after_input_norm=(s.language.input_writers[0],))(s)


@pytest.mark.parametrize("family, edit, message", [
    ("llava", _vision(feature_layers=(7,)), "feature layers \\[7\\]"),
    ("llava", _vision(feature_select="cls"), "feature select strategy"),
    ("llava", _projector(merge_size=2), "disagree with merge size"),
    ("idefics3", _projector(merge_size=1), "disagree with merge size"),
    ("internvl", _projector(merge_size=1), "norm .*layer_norm has width"),
    ("qwen2_5_vl", _vision(window_attention=WindowAttention(16, (9,))), "full-attention blocks"),
    ("glm4v", _projector(merge_size=3), "kernel"),
    ("glm4v", _foreign_after_norm_writer, "no input writer"),
    ("qwen3_vl", _only_q_norm, "only one of q_norm/k_norm"),
    ("qwen3_vl", _tap(vision_block=9), "vision block 9"),
    ("qwen3_vl", _tap(language_layer=9), "decoder layer 9"),
    ("qwen3_vl", _tap(groups=()), "does not feed the tap's first group"),
])
def test_validate_rejects_a_contradicting_convention(family, edit, message):
    model = tiny_case(family).model
    get_adapter(model).validate(model)  # the real spec passes
    with pytest.raises(UnsupportedModelError, match=message):
        _edited(model, edit).validate(model)


def test_forward_check_catches_a_wrong_norm_param_feed():
    case = tiny_case("glm4v")
    visual = case.model.model.visual

    def wrong_conv(s):
        final = s.vision.final_norm
        conv = dataclasses.replace(final.param_feeds[0], module=visual.patch_embed.proj, name="patch_embed.proj.weight")
        return _vision(final_norm=dataclasses.replace(final, param_feeds=(conv,)), input_norm=None)(s)

    adapter = _edited(case.model, wrong_conv)
    adapter.validate = lambda m: adapter.spec(m)  # skip the kernel check: only the data flow is wrong
    with pytest.raises(AssertionError, match="post_layernorm -> patch_embed.proj"):
        check_spec_against_forward(case.model, adapter, case.batch())


class _T5StyleNorm(nn.Module):
    """An RMS norm under another name, transformers style (`variance_epsilon`, no bias)."""

    def __init__(self):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(4)), 1e-6


class _BertStyleNorm(_T5StyleNorm):
    """Same attributes plus a bias: a mean-subtracting LayerNorm, not an RMSNorm."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))


@pytest.mark.parametrize("module, kind", [
    (nn.LayerNorm(4), "layernorm"),
    (ProjectedLayerNorm(4, 1e-5), "layernorm"),
    (nn.RMSNorm(4, eps=1e-6), "rmsnorm"),
    (UnifiedRMSNorm(4, 1e-6), "rmsnorm"),
    (ProjectedRMSNorm(4, 1e-6), "rmsnorm"),
    (_T5StyleNorm(), "rmsnorm"),
    (_BertStyleNorm(), None),
    (nn.Linear(4, 4), None),
])
def test_norm_kind_rules(module, kind):
    assert norm_kind(module) == kind


def test_describe_norm_refuses_implicit_eps_and_non_norms():
    assert describe_norm(nn.RMSNorm(4, eps=1e-6), "n") == ("rmsnorm", 1e-6)
    with pytest.raises(UnsupportedModelError, match="no explicit eps"):
        describe_norm(nn.RMSNorm(4), "n")
    with pytest.raises(UnsupportedModelError, match="neither a LayerNorm nor an RMSNorm"):
        describe_norm(nn.Linear(4, 4), "n")
