"""QuantState: one object per model, installed in one place, its modality hook tracks forwards."""

import torch
from torch import nn

from mquant.core.state import QuantState, modality_context


class _Echo(nn.Module):
    def forward(self, input_ids):
        return input_ids


def test_install_tracks_the_visual_mask_and_reinstall_replaces_the_hook():
    model = _Echo()
    state = QuantState(image_token_ids=(7,)).install(model)
    model(input_ids=torch.tensor([[1, 7, 7, 2]]))
    assert state.ctx.visual_mask.tolist() == [[False, True, True, False]]
    assert QuantState.of(model) is state and modality_context(model) is state.ctx
    fresh = QuantState(image_token_ids=(2,)).install(model)
    model(input_ids=torch.tensor([[1, 7, 2]]))
    assert fresh.ctx.visual_mask.tolist() == [[False, False, True]]
    assert state.ctx.visual_mask.shape == (1, 4)  # the replaced state's hook no longer runs
    assert len(model._forward_pre_hooks) == 1


def test_ensure_creates_one_state_and_records_structure():
    model = _Echo()
    assert QuantState.of(model) is None and modality_context(model) is None
    state = QuantState.ensure(model)
    state.record_structure("norms", {"a": 1})
    assert QuantState.ensure(model) is state and state.structure == {"norms": {"a": 1}}
    assert not model._forward_pre_hooks  # no token ids: nothing to track
