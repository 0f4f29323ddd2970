import json

import pytest
from PIL import Image

from mquant.calib.data import load_calibration_pairs, open_image
from mquant.config import CalibConfig
from mquant.errors import CalibrationError, ConfigError, InputError


def _image(path, color=(255, 0, 0)):
    Image.new("RGB", (16, 16), color).save(path)
    return path


def test_folder_source_is_deterministic(tmp_path):
    for i in range(5):
        _image(tmp_path / f"{i}.png", (i * 40, 0, 0))
    a = load_calibration_pairs(CalibConfig(source=str(tmp_path), n_samples=3, seed=1))
    b = load_calibration_pairs(CalibConfig(source=str(tmp_path), n_samples=3, seed=1))
    assert a == b and len(a) == 3 and all(p.image_path.endswith(".png") for p in a)


def test_jsonl_source_resolves_relative_paths(tmp_path):
    _image(tmp_path / "cat.png")
    (tmp_path / "calib.jsonl").write_text(json.dumps({"image": "cat.png", "prompt": "What is it?"}) + "\n\n")
    (pair,) = load_calibration_pairs(CalibConfig(source=str(tmp_path / "calib.jsonl"), n_samples=4))
    assert pair.prompt == "What is it?" and pair.image_path == str(tmp_path / "cat.png")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"image": "a.png"}\nnot json\n')
    with pytest.raises(CalibrationError, match=r"calib.jsonl:2"):
        load_calibration_pairs(CalibConfig(source=str(path)))


def test_empty_folder_and_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="holds no images"):
        load_calibration_pairs(CalibConfig(source=str(tmp_path)))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration_pairs(CalibConfig(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError):
        CalibConfig(n_samples=0)


def test_default_source_is_the_train_split():
    pairs = load_calibration_pairs(CalibConfig(n_samples=8))
    assert len(pairs) == 8 and all("/train/" in p.image_path for p in pairs)


def test_undecodable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot be decoded"):
        open_image(str(bad))


# ---- text-only causal LMs ----
def _tokenizer():
    from mquant.testing.tiny.processors import tiny_tokenizer

    return tiny_tokenizer({})


def test_default_text_is_disjoint_from_the_perplexity_text():
    from mquant.calib.data import EVAL_TEXT_CHARS, load_calibration_texts
    from mquant.eval.perplexity import offline_text_corpus

    (text,) = load_calibration_texts(CalibConfig())
    whole = offline_text_corpus(10**8)
    assert len(offline_text_corpus()) == EVAL_TEXT_CHARS and whole.endswith(text) and len(whole) == EVAL_TEXT_CHARS + len(text)


def test_text_windows_are_deterministic_and_bounded():
    from mquant.calib.data import TEXT_TOKENS, build_text_calibration_inputs
    from mquant.demo.smollm import load_smollm2_tokenizer

    tokenizer = load_smollm2_tokenizer()  # real English subwords: windows of prose differ
    a = build_text_calibration_inputs(CalibConfig(n_samples=3, seed=1), tokenizer)
    b = build_text_calibration_inputs(CalibConfig(n_samples=3, seed=1), tokenizer)
    c = build_text_calibration_inputs(CalibConfig(n_samples=3, seed=2), tokenizer)
    assert len(a) == 3 and all(s["input_ids"].shape == (1, TEXT_TOKENS) == s["attention_mask"].shape for s in a)
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c))


def test_text_folder_and_jsonl_sources(tmp_path):
    from mquant.calib.data import build_text_calibration_inputs

    (tmp_path / "a.txt").write_text("t5 t6 t7")
    (tmp_path / "b.md").write_text("t8 t9")
    _image(tmp_path / "ignored.png")
    samples = build_text_calibration_inputs(CalibConfig(source=str(tmp_path), n_samples=5), _tokenizer())
    assert sorted(s["input_ids"].tolist()[0] for s in samples) == [[5, 6, 7], [8, 9]]
    (tmp_path / "calib.jsonl").write_text(json.dumps({"text": "t3 t4"}) + "\n" + json.dumps({"prompt": "t2 t2"}) + "\n")
    samples = build_text_calibration_inputs(CalibConfig(source=str(tmp_path / "calib.jsonl"), n_samples=5), _tokenizer())
    assert sorted(s["input_ids"].tolist()[0] for s in samples) == [[2, 2], [3, 4]]


def test_image_only_source_for_a_text_model_fails_in_one_line(tmp_path):
    from mquant.calib.data import build_text_calibration_inputs

    _image(tmp_path / "x.png")
    with pytest.raises(CalibrationError, match="holds no text.*text-only model") as info:
        build_text_calibration_inputs(CalibConfig(source=str(tmp_path)), _tokenizer())
    assert "\n" not in str(info.value)
