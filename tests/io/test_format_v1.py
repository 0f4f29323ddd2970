"""Models saved in format_version 1 before the re-layering still load and run bit-identically.

tests/fixtures/format_v1/<family>/ was written by mquant at commit 51099ed (the layout before the
re-layering): MQuant W4A8 language + W8A8 vision (LN→RMSNorm, rotation, online Hadamard, RMS, MSQ,
AIFS). expected.safetensors holds a batch and the logits the model produced right after quantize.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mquant.api import load_quantized

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_format_v1_loads_bit_identically(family):
    directory = FIXTURES / family
    assert json.loads((directory / "mquant_config.json").read_text())["format_version"] == 1
    saved = load_file(directory / "expected.safetensors")
    expected = saved.pop("expected_logits")
    model = load_quantized(directory)
    with torch.no_grad():
        logits = model(**saved).logits
    assert torch.equal(logits, expected)
