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
