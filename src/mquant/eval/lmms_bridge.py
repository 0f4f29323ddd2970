"""Let lmms-eval drive any mquant model through two plain callables.

lmms-eval calls a model object's `generate_until(requests)` / `loglikelihood(requests)`, where
each request's `.args` is the tuple `(context, gen_kwargs | doc_to_target, doc_to_visual,
doc_id, task, split)` and the document is found in `self.task_dict[task][split][doc_id]`.
`LMMSBridge` implements that protocol without importing lmms-eval (so it is testable here);
`lmms_eval_model(...)` builds the real, registered lmms-eval subclass, importing lmms-eval
only then.

Usage (with lmms-eval installed)::

    from lmms_eval.evaluator import simple_evaluate
    lm = lmms_eval_model(generate_fn=my_generate, loglik_fn=my_loglik)
    simple_evaluate(model=lm, tasks=["mme"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mquant.errors import InputError

# images[i] is the list of images (PIL) for prompt i; returns one reply per prompt.
GenerateFn = Callable[[list[list[Any]], list[str], int], list[str]]
# Returns (log P(continuation | images, context), continuation-is-greedy) per request.
LoglikFn = Callable[[list[list[Any]], list[str], list[str]], list[tuple[float, bool]]]

DEFAULT_NAME = "mquant"


def require_lmms_eval() -> Any:
    """Import lmms-eval or explain how to get it."""
    try:
        # optional: lmms-eval is not installed by default
        import lmms_eval.api.model as lmms_model

        # optional: lmms-eval is not installed by default
        import lmms_eval.api.registry as lmms_registry
    except ImportError as exc:
        raise InputError(
            "lmms-eval is not installed; run `pip install lmms-eval` to evaluate with it"
        ) from exc
    return lmms_model, lmms_registry


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """Cut a reply at the earliest stop string (lmms-eval's `until`), as HF generation would."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class LMMSBridge:
    """lmms-eval's `lmms` model protocol over `generate_fn` and optional `loglik_fn`.

    Requests are grouped by identical generation settings and sent in batches of
    `batch_size`; replies come back in request order.
    """

    model_name = DEFAULT_NAME  # read by lmms-eval to name its response cache

    def __init__(
        self,
        generate_fn: GenerateFn,
        loglik_fn: LoglikFn | None = None,
        batch_size: int = 1,
        max_new_tokens: int = 128,
        task_dict: dict[str, Any] | None = None,
    ) -> None:
        if not callable(generate_fn):
            raise InputError("generate_fn must be callable(images, prompts, max_new_tokens)")
        if loglik_fn is not None and not callable(loglik_fn):
            raise InputError("loglik_fn must be callable(images, contexts, continuations)")
        if int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise InputError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.generate_fn = generate_fn
        self.loglik_fn = loglik_fn
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        # lmms-eval's evaluator assigns the real task dict before calling us.
        self.task_dict: dict[str, Any] = task_dict if task_dict is not None else {}
        self._rank, self._world_size = 0, 1

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        """The request's images: `doc_to_visual(doc)` may give a list, one image, or None."""
        if doc_to_visual is None:
            return []
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as exc:
            raise InputError(
                f"document {doc_id!r} of task {task!r} split {split!r} is not in task_dict; "
                "let lmms-eval's evaluator set model.task_dict"
            ) from exc
        visuals = doc_to_visual(doc)
        if visuals is None:
            return []
        return list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]

    def _generation_settings(self, gen_kwargs: dict[str, Any] | None) -> tuple[int, tuple[str, ...]]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(u, str) for u in until):
            raise InputError(f"gen_kwargs 'until' must be a string or list of strings, got {until!r}")
        return int(kwargs.get("max_new_tokens", self.max_new_tokens)), tuple(until)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One reply per request, truncated at the request's stop strings."""
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        parsed = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = _unpack(request, "generate_until")
            settings = self._generation_settings(gen_kwargs)
            groups.setdefault(settings, []).append(index)
            parsed.append((context, self._visuals(doc_to_visual, doc_id, task, split)))
        replies: list[str | None] = [None] * len(requests)
        for (max_new_tokens, until), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                outputs = self.generate_fn(
                    [parsed[i][1] for i in batch], [parsed[i][0] for i in batch], max_new_tokens
                )
                _check_count(outputs, batch, "generate_fn")
                for i, text in zip(batch, outputs):
                    replies[i] = truncate_at_stop(str(text), until)
        return [r if r is not None else "" for r in replies]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether it is the greedy continuation)."""
        if self.loglik_fn is None:
            raise InputError(
                "this task needs log-likelihoods but the bridge has no loglik_fn; pass loglik_fn="
            )
        images, contexts, continuations = [], [], []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = _unpack(request, "loglikelihood")
            if isinstance(doc_to_target, str):
                continuation = doc_to_target
            else:
                continuation = doc_to_target(self.task_dict[task][split][doc_id])
            images.append(self._visuals(doc_to_visual, doc_id, task, split))
            contexts.append(context)
            continuations.append(str(continuation))
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            stop = start + self.batch_size
            outputs = self.loglik_fn(images[start:stop], contexts[start:stop], continuations[start:stop])
            _check_count(outputs, range(start, min(stop, len(requests))), "loglik_fn")
            results.extend((float(lp), bool(greedy)) for lp, greedy in outputs)
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Multi-round chat tasks need a conversation state the two callables do not have."""
        raise InputError(
            "multi-round tasks are not supported by the mquant bridge; choose single-turn tasks"
        )


def _unpack(request: Any, method: str) -> tuple[Any, ...]:
    args = getattr(request, "args", None)
    if not isinstance(args, tuple) or len(args) != 6:
        raise InputError(
            f"{method} got a request whose .args is not the 6-tuple (context, kwargs/target, "
            "doc_to_visual, doc_id, task, split); use a 'simple' (non-chat) lmms-eval version"
        )
    return args


def _check_count(outputs: Any, batch: Sequence[int], name: str) -> None:
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(batch):
        got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise InputError(f"{name} returned {got} results for {len(batch)} requests; return one per request")


_REGISTERED: dict[str, type] = {}


def lmms_eval_model_class(name: str = DEFAULT_NAME) -> type:
    """The lmms-eval subclass of `LMMSBridge`, registered in lmms-eval's model registry
    under `name` (created once per name)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    lmms_model, lmms_registry = require_lmms_eval()
    base = lmms_model.lmms

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self)  # rank, cache hook, cache dir bookkeeping lmms-eval relies on
        LMMSBridge.__init__(self, *args, **kwargs)

    cls = type(f"MQuantLMMS_{name}", (LMMSBridge, base), {"__init__": __init__, "model_name": name})
    lmms_registry.register_model(name)(cls)
    _REGISTERED[name] = cls
    return cls


def lmms_eval_model(
    generate_fn: GenerateFn,
    loglik_fn: LoglikFn | None = None,
    name: str = DEFAULT_NAME,
    batch_size: int = 1,
    max_new_tokens: int = 128,
) -> Any:
    """An lmms-eval model instance wrapping the callables; pass it as `simple_evaluate(model=...)`."""
    cls = lmms_eval_model_class(name)
    return cls(generate_fn, loglik_fn=loglik_fn, batch_size=batch_size, max_new_tokens=max_new_tokens)
