"""Fuzz: whatever happens to the bytes of model.safetensors or mquant_config.json, load_quantized
either loads a model or raises MQuantError — never another exception, a crash or a hang."""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mquant.api import load_quantized, quantize, save_quantized
from mquant.config import recipe_for
from mquant.errors import MQuantError
from mquant.testing.tiny import tiny_case

JSON_SCALARS = st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=6)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w4a8", vision_scheme="w8a8"), [case.batch(batch_size=1, seed=0)])
    out = tmp_path_factory.mktemp("pristine") / "q"
    save_quantized(model, out)
    return out


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@st.composite
def byte_mutation(draw, size: int, header_end: int):
    """(kind, position, payload) applied by `_apply`; positions favour the safetensors header/JSON text."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
    hot = draw(st.booleans())
    position = draw(st.integers(0, max(0, (header_end if hot else size) - 1)))
    payload = draw(st.binary(min_size=1, max_size=16))
    return kind, position, payload


def _apply(data: bytes, mutation) -> bytes:
    kind, pos, payload = mutation
    pos = min(pos, len(data) - 1)  # an earlier mutation may have shortened the data
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ (payload[0] or 1)]) + data[pos + 1:]
    if kind == "overwrite":
        return data[:pos] + payload + data[pos + len(payload):]
    if kind == "insert":
        return data[:pos] + payload + data[pos:]
    return data[:pos] + data[pos + len(payload):]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    clone = copy.copy(value)
    clone[head] = _replace(value[head], rest, new)
    return clone


def _expect_load_or_mquant_error(directory: Path) -> None:
    try:
        load_quantized(directory)
    except MQuantError:
        pass


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_bytes_load_or_raise_mquant_error(pristine, data):
    target = data.draw(st.sampled_from(["model.safetensors", "mquant_config.json"]))
    original = (pristine / target).read_bytes()
    header_end = _header_len(original) if target == "model.safetensors" else len(original)
    mutations = data.draw(st.lists(byte_mutation(len(original), min(header_end, len(original))), min_size=1, max_size=3))
    mutated = original
    for mutation in mutations:
        mutated = _apply(mutated, mutation) if mutated else mutated
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "q"
        shutil.copytree(pristine, directory)
        (directory / target).write_bytes(mutated)
        _expect_load_or_mquant_error(directory)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_json_values_load_or_raise_mquant_error(pristine, data):
    meta = json.loads((pristine / "mquant_config.json").read_text())
    path = data.draw(st.sampled_from(list(_paths(meta))))
    mutated = _replace(meta, path, data.draw(JSON_VALUES))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "q"
        shutil.copytree(pristine, directory)
        (directory / "mquant_config.json").write_text(json.dumps(mutated))
        _expect_load_or_mquant_error(directory)
