"""The lmms-eval bridge with fake requests; lmms-eval itself is faked, never installed."""

from __future__ import annotations

import abc
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest

from mquant.errors import InputError
from mquant.eval import lmms_bridge
from mquant.eval.lmms_bridge import LMMSBridge, lmms_eval_model, require_lmms_eval, truncate_at_stop


@dataclass
class FakeRequest:
    """Stand-in for lmms_eval.api.instance.Instance: only `.args` is read."""

    args: tuple[Any, ...]


TASK_DICT = {"toy": {"test": [{"img": "IMG0", "label": "cat"}, {"img": "IMG1", "label": "dog"}]}}


def doc_to_visual(doc: dict[str, str]) -> list[str]:
    return [doc["img"]]


class RecordingGenerate:
    def __init__(self) -> None:
        self.calls: list[tuple[list[list[Any]], list[str], int]] = []

    def __call__(self, images: list[list[Any]], prompts: list[str], max_new_tokens: int) -> list[str]:
        self.calls.append((images, prompts, max_new_tokens))
        return [f"answer to {p}\nUSER: more" for p in prompts]


def _gen_request(prompt: str, doc_id: int, **gen_kwargs: Any) -> FakeRequest:
    return FakeRequest((prompt, gen_kwargs, doc_to_visual, doc_id, "toy", "test"))


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("abc\nUSER: x", ["\nUSER:", "zzz"]) == "abc"
    assert truncate_at_stop("a.b.c", [".", "b"]) == "a"
    assert truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("abc", [""]) == "abc"


def test_generate_until_groups_batches_and_keeps_order() -> None:
    fn = RecordingGenerate()
    bridge = LMMSBridge(fn, batch_size=2, max_new_tokens=16, task_dict=TASK_DICT)
    requests = [
        _gen_request("q0", 0, until=["\nUSER:"]),
        _gen_request("q1", 1, until=["\nUSER:"], max_new_tokens=4),
        _gen_request("q2", 1, until=["\nUSER:"]),
        _gen_request("q3", 0, until="\n"),
    ]
    replies = bridge.generate_until(requests)
    assert replies == ["answer to q0", "answer to q1", "answer to q2", "answer to q3"]
    # q0 and q2 share settings -> one batch of 2; q1 (4 tokens) and q3 (other stop) alone
    assert [(c[1], c[2]) for c in fn.calls] == [(["q0", "q2"], 16), (["q1"], 4), (["q3"], 16)]
    assert fn.calls[0][0] == [["IMG0"], ["IMG1"]]


def test_generate_until_without_visuals_and_bad_outputs() -> None:
    bridge = LMMSBridge(lambda imgs, prompts, n: ["x"] * len(prompts), task_dict=TASK_DICT)
    request = FakeRequest(("q", {}, None, 0, "toy", "test"))
    assert bridge.generate_until([request]) == ["x"]
    broken = LMMSBridge(lambda imgs, prompts, n: [], task_dict=TASK_DICT)
    with pytest.raises(InputError, match="generate_fn returned 0 results for 1"):
        broken.generate_until([_gen_request("q", 0)])
    with pytest.raises(InputError, match="not in task_dict"):
        LMMSBridge(RecordingGenerate()).generate_until([_gen_request("q", 0)])
    with pytest.raises(InputError, match="6-tuple"):
        bridge.generate_until([FakeRequest(("q", {}))])


def test_loglikelihood_resolves_targets() -> None:
    seen: list[tuple[list[list[Any]], list[str], list[str]]] = []

    def loglik(images: list[list[Any]], contexts: list[str], conts: list[str]) -> list[tuple[float, bool]]:
        seen.append((images, contexts, conts))
        return [(-float(len(c)), c == "cat") for c in conts]

    bridge = LMMSBridge(RecordingGenerate(), loglik_fn=loglik, batch_size=2, task_dict=TASK_DICT)
    requests = [
        FakeRequest(("ctx0", " cat", doc_to_visual, 0, "toy", "test")),
        FakeRequest(("ctx1", lambda doc: doc["label"], doc_to_visual, 1, "toy", "test")),
        FakeRequest(("ctx2", lambda doc: doc["label"], doc_to_visual, 0, "toy", "test")),
    ]
    assert bridge.loglikelihood(requests) == [(-4.0, False), (-3.0, False), (-3.0, True)]
    assert seen[0] == ([["IMG0"], ["IMG1"]], ["ctx0", "ctx1"], [" cat", "dog"])
    assert len(seen) == 2
    with pytest.raises(InputError, match="no loglik_fn"):
        LMMSBridge(RecordingGenerate(), task_dict=TASK_DICT).loglikelihood(requests)


def test_constructor_and_multi_round_errors() -> None:
    with pytest.raises(InputError, match="generate_fn must be callable"):
        LMMSBridge("not a function")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="batch_size"):
        LMMSBridge(RecordingGenerate(), batch_size=0)
    with pytest.raises(InputError, match="multi-round"):
        LMMSBridge(RecordingGenerate()).generate_until_multi_round([])


def test_missing_lmms_eval_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # makes `import lmms_eval` fail
    with pytest.raises(InputError, match="pip install lmms-eval"):
        require_lmms_eval()


def test_registration_with_fake_lmms_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    class lmms(abc.ABC):  # noqa: N801  (the real class name)
        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @abc.abstractmethod
        def loglikelihood(self, requests: Any) -> Any: ...

        @abc.abstractmethod
        def generate_until(self, requests: Any) -> Any: ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests: Any) -> Any: ...

    registry: dict[str, type] = {}

    def register_model(*names: str) -> Any:
        def decorate(cls: type) -> type:
            assert issubclass(cls, lmms)
            registry.update({n: cls for n in names})
            return cls

        return decorate

    package, api = types.ModuleType("lmms_eval"), types.ModuleType("lmms_eval.api")
    model_mod, registry_mod = types.ModuleType("lmms_eval.api.model"), types.ModuleType("lmms_eval.api.registry")
    model_mod.lmms = lmms  # type: ignore[attr-defined]
    registry_mod.register_model = register_model  # type: ignore[attr-defined]
    package.api, api.model, api.registry = api, model_mod, registry_mod  # type: ignore[attr-defined]
    for name, module in [("lmms_eval", package), ("lmms_eval.api", api),
                         ("lmms_eval.api.model", model_mod), ("lmms_eval.api.registry", registry_mod)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(lmms_bridge, "_REGISTERED", {})

    model = lmms_eval_model(RecordingGenerate(), name="mquant_test", batch_size=3)
    assert isinstance(model, lmms) and isinstance(model, LMMSBridge)
    assert registry["mquant_test"] is type(model)
    assert model.batch_size == 3 and model.rank == 0 and model.world_size == 1
    model.task_dict = TASK_DICT  # what lmms-eval's evaluator does
    assert model.generate_until([_gen_request("hi", 1)]) == ["answer to hi\nUSER: more"]
    assert lmms_bridge.lmms_eval_model_class("mquant_test") is type(model)
