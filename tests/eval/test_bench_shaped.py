"""The 2B-shaped round-robin bench at toy size: every variant runs in every round, the summary and
ratios are complete, and the fp32 turn leaves the shared bf16 model exactly as it was."""

import torch

from mquant.eval import bench_shaped as bs


def test_round_robin_bench_reports_every_variant_and_restores_bf16(monkeypatch):
    built = {}
    real_random_model = bs.random_model

    def keep(*args, **kwargs):
        built["model"] = real_random_model(*args, **kwargs)
        built["before"] = {k: v.clone() for k, v in built["model"].state_dict().items()}
        return built["model"]

    monkeypatch.setattr(bs, "random_model", keep)
    result = bs.bench_shaped("qwen2-vl-2b-shaped", visual_tokens=16, text_tokens=8, new_tokens=3, rounds=2, scale_down=4, depth=1)
    assert result["rounds"] == 2 and result["visual_tokens"] == 16 and len(result["round_s"]) == 3
    assert set(result["summary"]) == set(bs.SHAPED_VARIANTS)
    for row in result["per_round"]:
        assert all(row[v]["prefill_wall_s"] > 0 and row[v]["decode_cpu_s_per_token"] > 0 for v in bs.SHAPED_VARIANTS)
    assert "prefill_wall_w8a8-static_vs_bf16" in result["ratios"] and "decode_cpu_w4a8-static_vs_w8a8-static" in result["ratios"]
    after = built["model"].state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in built["before"].items())
    assert "interleaved rounds" in bs.shaped_text(result)


def test_unknown_variant_is_a_config_error():
    from mquant.errors import ConfigError

    try:
        bs.bench_shaped("qwen2-vl-2b-shaped", variants=["fp8"])
    except ConfigError as exc:
        assert "fp8" in str(exc)
    else:
        raise AssertionError("no error")
