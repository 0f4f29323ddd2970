"""Helpers shared by the per-family adapter tests (the shared suite is test_adapter_suite.py)."""

import pytest
import torch

from mquant.testing.tiny import tiny_case


@pytest.fixture(scope="module")
def case(request):
    """The tiny case of the test module's `FAMILY` (in its `DTYPE`, float32 unless set)."""
    return tiny_case(request.module.FAMILY, dtype=getattr(request.module, "DTYPE", torch.float32))


@pytest.fixture(scope="module")
def spec(request, case):
    """`case.model`'s spec as the test module's `ADAPTER` validates it."""
    return request.module.ADAPTER().validate(case.model)


@pytest.fixture
def record_first_io():
    """`record(modules) -> (ins, outs)`: the first input and output of each module during the forward
    passes run afterwards in the test; the hooks are removed when the test ends."""
    handles = []

    def record(modules):
        ins, outs = {}, {}

        def pre(mod, args, kwargs):
            ins.setdefault(mod, args[0] if args else kwargs["hidden_states"])

        def post(mod, args, out):
            outs.setdefault(mod, out)

        for m in modules:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
        return ins, outs

    yield record
    for handle in handles:
        handle.remove()
