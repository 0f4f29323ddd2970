"""`run_bench` measures every variant on one model and inputs (no assertions on time)."""

from mquant.eval.bench import VARIANTS, run_bench
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


def test_noaifs_variant_is_the_mquant_recipe_without_aifs():
    from mquant.eval.bench import variant_recipe

    full, noaifs = variant_recipe("w4a8-static"), variant_recipe("w4a8-static-noaifs")
    assert full.has("aifs") and noaifs.step_names == tuple(s for s in full.step_names if s != "aifs")
    assert (noaifs.language, noaifs.vision, noaifs.weight_method) == (full.language, full.vision, full.weight_method)
