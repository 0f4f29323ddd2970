"""Resumable calibration: a run that crashes after block k and is rerun with the same checkpoint
directory gives exactly the model of an uninterrupted run, without recalibrating finished blocks."""

import copy
import json

import pytest
import torch

from mquant.api import quantize
from mquant.calib.sequential import SequentialCalibrator
from mquant.config import recipe_for
from mquant.errors import CheckpointError
from mquant.testing.tiny import tiny_case

# SmoothQuant edits the blocks' norms before quantizing: the checkpoint must carry them too.
RECIPE = recipe_for("smoothquant", "w8a8")


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def setup():
    case = tiny_case("qwen2_vl")
    samples = [case.batch(batch_size=1, seed=i) for i in range(2)]
    model = copy.deepcopy(case.model)
    report = quantize(model, RECIPE, samples)
    batch = case.batch(batch_size=2, seed=50, text_only_row=True)
    with torch.no_grad():
        reference = model(**batch).logits
    return case, samples, batch, reference, report


def _crash_after(label):
    def progress(seen, _advance):
        if seen == label:
            raise Crash(seen)

    return progress


@pytest.mark.parametrize("crash_at", ["vision 1/2", "projector", "language 1/2"])
def test_resume_after_crash_equals_uninterrupted_run(setup, tmp_path, monkeypatch, crash_at):
    case, samples, batch, reference, report = setup
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        quantize(copy.deepcopy(case.model), RECIPE, samples, progress=_crash_after(crash_at), checkpoint_dir=ckpt)
    finished = json.loads((ckpt / "manifest.json").read_text())["finished"]
    order = ["vision-0000", "vision-0001", "projector-0000", "language-0000", "language-0001"]
    expected_done = {"vision 1/2": 1, "projector": 3, "language 1/2": 4}[crash_at]
    assert finished == order[:expected_done]

    calibrated = []
    original = SequentialCalibrator.process_with_runner

    def counting(self, block, runner, scheme, part, val_runner=None):
        calibrated.append(part)
        return original(self, block, runner, scheme, part, val_runner)

    monkeypatch.setattr(SequentialCalibrator, "process_with_runner", counting)
    model = copy.deepcopy(case.model)
    resumed = quantize(model, RECIPE, samples, checkpoint_dir=ckpt)
    assert len(calibrated) == len(order) - expected_done
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    assert [r.name for r in resumed.layers] == [r.name for r in report.layers]
    assert [r.output_error for r in resumed.layers] == [r.output_error for r in report.layers]


def test_other_recipe_or_samples_refuse_the_directory(setup, tmp_path):
    case, samples, _, _, _ = setup
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        quantize(copy.deepcopy(case.model), RECIPE, samples, progress=_crash_after("vision 1/2"), checkpoint_dir=ckpt)
    for recipe, calib in [(recipe_for("rtn", "w8a8"), samples), (RECIPE, samples[:1])]:
        with pytest.raises(CheckpointError, match="another model, recipe or calibration set"):
            quantize(copy.deepcopy(case.model), recipe, calib, checkpoint_dir=ckpt)


def test_damaged_block_file_is_a_checkpoint_error(setup, tmp_path):
    case, samples, _, _, _ = setup
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        quantize(copy.deepcopy(case.model), RECIPE, samples, progress=_crash_after("vision 1/2"), checkpoint_dir=ckpt)
    (ckpt / "vision-0000.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="vision-0000.safetensors"):
        quantize(copy.deepcopy(case.model), RECIPE, samples, checkpoint_dir=ckpt)
