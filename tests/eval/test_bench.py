"""`run_bench` measures every variant on one model and inputs (no assertions on time)."""

import dataclasses

import pytest
import torch

from mquant.errors import ConfigError
from mquant.eval.bench import VARIANTS, bench_device, run_bench, variant_recipe
from mquant.kernels import common, select_backend
from mquant.testing.tiny import tiny_case


def test_bench_rows_and_memory_ordering():
    case = tiny_case("llava")
    result = run_bench(case.model, case.batch(batch_size=1, seed=3), [case.batch(batch_size=1, seed=i) for i in range(2)],
                       new_tokens=3, repeats=1, log=lambda _: None)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(VARIANTS)
    for row in rows.values():
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0 and row["peak_bytes"] >= row["weight_bytes"] > 0
    assert rows["w4a8-static"]["weight_bytes"] < rows["w8a8-static"]["weight_bytes"] < rows["bf16"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert "prefill_speedup_w8a8-static_vs_bf16" in result["ratios"]
    # each quantized row names the backend its layers really ran on (CPU here: never triton)
    expected = {select_backend(8), select_backend(4)}
    for name in ("w8a8-static", "w4a8-static", "w4a8-dynamic"):
        assert set(rows[name]["backend"].split("+")) <= expected and "triton" not in rows[name]["backend"]
    assert result["device"] == "cpu"


def test_bench_device_errors_are_one_line():
    assert bench_device("cpu") == torch.device("cpu")
    for bad, message in (("meta", "runs on cpu or cuda"), ("nonsense", "unknown device")):
        with pytest.raises(ConfigError, match=message):
            bench_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            bench_device("cuda")


def test_cuda_weights_select_the_triton_kernels(monkeypatch):
    """What `mquant bench --device cuda` relies on: weights prepared on CUDA pick Triton (here, with
    no GPU, the Triton backend is told it runs on CUDA; its kernels are tested in tests/kernels)."""
    assert select_backend(8) != "triton" and select_backend(4) != "triton"
    for bits in (4, 8):
        backend = common._REGISTRY[(bits, "triton")]
        monkeypatch.setitem(common._REGISTRY, (bits, "triton"),
                            dataclasses.replace(backend, available=lambda: True, device_types=lambda: ("cuda",)))
        assert select_backend(bits, device="cuda") == "triton" and select_backend(bits) != "triton"


def test_noaifs_variant_is_the_mquant_recipe_without_aifs():
    full, noaifs = variant_recipe("w4a8-static"), variant_recipe("w4a8-static-noaifs")
    assert full.has("aifs") and noaifs.step_names == tuple(s for s in full.step_names if s != "aifs")
    assert (noaifs.language, noaifs.vision, noaifs.weight_method) == (full.language, full.vision, full.weight_method)
