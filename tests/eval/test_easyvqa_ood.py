from mquant.config import recipe_for
from mquant.demo.easyvqa_ood import SUBSETS
from mquant.eval.ablation import VariantResult, calibration_rows, markdown_table, recipes_for_rows
from mquant.eval.easyvqa_ood import with_all_row
from mquant.eval.harness import run_eval


def test_easyvqa_ood_runs_on_a_tiny_subset_of_the_default_model():
    result = run_eval(None, "easy-vqa-ood", limit=4, batch_size=8)
    assert result["task"] == "easy-vqa-ood" and result["n_per_subset"] == 4
    assert list(result["subsets"]) == [*SUBSETS, "all"]
    assert all(r["n"] == 4 and 0 <= r["accuracy"] <= 1 for name, r in result["subsets"].items() if name != "all")
    assert result["subsets"]["all"]["n"] == 16


def test_all_row_weights_by_questions_and_table_has_a_column_per_subset():
    per = {"a": {"n": 1, "accuracy": 1.0, "kl": 0.0}, "b": {"n": 3, "accuracy": 0.0, "kl": 0.4}}
    assert with_all_row(per)["all"] == {"n": 4, "accuracy": 0.25, "kl": 0.30000000000000004}
    row = VariantResult("mquant", "w4a8", 0.9, 0.01, 0.99, 1, 1.0, 1.0, with_all_row(per))
    table = markdown_table([row])
    assert "a acc / KL" in table and "all acc / KL" in table and "| 0.0% / 0.4000 |" in table


def test_calibration_rows_change_one_option_at_a_time():
    rows = {name: (recipe, calib) for name, recipe, calib in calibration_rows("w4a8", 16)}
    base_recipe, base_calib = rows["mquant-minmax"]
    assert base_recipe.observer == "minmax" and not base_recipe.step("msq").first_token
    assert rows["mquant-first"][0].step("msq").first_token and rows["mquant-first"][0].observer == "minmax"
    assert rows["mquant"][0] == recipe_for("mquant", "w4a8")  # the default: first-token scale + MSE clipping
    assert rows["mquant"][0].observer == "mse" and rows["mquant"][0].step("msq").first_token
    assert rows["mquant-n64"][1].n_samples == 64 and rows["mquant-diverse"][1].prompts == "diverse"
    assert rows["mquant-decode4"][1].decode_tokens == 4 and rows["mquant-mse"][0].observer == "mse"
    assert rows["mquant-auto"][0].observer == "auto" and rows["mquant-auto"][1].n_validation > 0
    assert all(r.step_names == base_recipe.step_names for r, _ in rows.values())
    assert [n for n, *_ in recipes_for_rows("ood", "w4a8", 16)] == ["gptq-dynamic", "mquant", "mquant-robust"]
