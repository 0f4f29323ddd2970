"""Broken checkpoint directories end in one-line CheckpointErrors (API) or `error: …` with a non-zero
exit (CLI), never a traceback, and the broken files are only read."""

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mquant.api import load_quantized, quantize, save_quantized
from mquant.config import recipe_for
from mquant.errors import CheckpointError, ResourceError
from mquant.testing.tiny import tiny_case

FIX_WORDS = ("re-run", "restore", "copy", "re-quantize")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w4a8", vision_scheme="w8a8"), [case.batch(batch_size=1, seed=0)])
    out = tmp_path_factory.mktemp("saved") / "q"
    save_quantized(model, out)
    return model, out


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt_header(d):
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:24] = b"\x00garbage\xff\xfe{[}]:,\x01"
    (d / "model.safetensors").write_bytes(bytes(data))


def _edit_json(name, edit):
    def apply(d):
        data = json.loads((d / name).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))

    return apply


def _double_hidden(cfg):
    cfg["text_config"]["hidden_size"] = 128
    cfg["vision_config"]["hidden_size"] = 128


BROKEN = {
    "truncated-weights": (_truncate, "model.safetensors"),
    "corrupt-weights": (_corrupt_header, "model.safetensors"),
    "random-weights": (lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)), "model.safetensors"),
    "empty-weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors"),
    "missing-weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "missing-mquant-config": (lambda d: (d / "mquant_config.json").unlink(), "mquant_config.json"),
    "missing-config": (lambda d: (d / "config.json").unlink(), "config.json"),
    "other-format-version": (_edit_json("mquant_config.json", lambda m: m.update(format_version=2)), "mquant_config.json"),
    "invalid-mquant-json": (lambda d: (d / "mquant_config.json").write_text('{"format": "mquant", '), "mquant_config.json"),
    "invalid-config-json": (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    "config-shapes-differ": (_edit_json("config.json", _double_hidden), "config.json"),
    "config-vocab-differs": (_edit_json("config.json", lambda c: c["text_config"].update(vocab_size=300)), "config.json"),
    "layer-bits-invalid": (_edit_json("mquant_config.json", lambda m: next(iter(m["layers"].values())).update(weight_bits=3)),
                           "mquant_config.json"),
}


def _broken_copy(saved_dir: Path, tmp_path: Path, breaker) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    breaker(broken)
    return broken


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_directory_is_a_one_line_checkpoint_error(saved, tmp_path, kind):
    breaker, culprit = BROKEN[kind]
    broken = _broken_copy(saved[1], tmp_path, breaker)
    before = _hashes(broken)
    with pytest.raises(CheckpointError) as info:
        load_quantized(broken)
    message = str(info.value)
    assert "\n" not in message and culprit in message and any(w in message for w in FIX_WORDS), message
    assert _hashes(broken) == before


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from mquant.cli import main

    monkeypatch.setattr(sys, "argv", ["mquant", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated-weights", "other-format-version", "config-shapes-differ", "invalid-mquant-json"])
@pytest.mark.parametrize("command", [["info"], ["eval", "--task", "easy-vqa", "--limit", "1"]])
def test_cli_reports_error_line_and_exits_nonzero(saved, tmp_path, monkeypatch, capsys, kind, command):
    breaker, culprit = BROKEN[kind]
    broken = _broken_copy(saved[1], tmp_path, breaker)
    before = _hashes(broken)
    code, err = _cli([command[0], str(broken), *command[1:]], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err
    assert lines[-1].startswith("error: ") and culprit in lines[-1], err
    assert _hashes(broken) == before


def test_cli_in_a_real_process_prints_no_traceback(saved, tmp_path):
    broken = _broken_copy(saved[1], tmp_path, _truncate)
    proc = subprocess.run([sys.executable, "-c", "from mquant.cli import main; main()", "info", str(broken)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "model.safetensors" in proc.stderr


def test_disk_full_while_saving_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    import mquant.io.native as native

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(native, "save_file", full)
    out = tmp_path / "out" / "q"
    with pytest.raises(ResourceError) as info:
        save_quantized(saved[0], out)
    assert "disk full" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_disk_full_keeps_an_existing_output_intact(saved, tmp_path, monkeypatch):
    import mquant.io.native as native

    out = tmp_path / "q"
    shutil.copytree(saved[1], out)
    before = _hashes(out)
    monkeypatch.setattr(native, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(ResourceError):
        save_quantized(saved[0], out)
    assert _hashes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_healthy_copy_still_loads(saved, tmp_path):
    model, out = saved
    copy_dir = _broken_copy(out, tmp_path, lambda d: None)
    batch = tiny_case("qwen2_vl").batch(batch_size=1, seed=3)
    with torch.no_grad():
        assert torch.equal(load_quantized(copy_dir)(**batch).logits, model(**batch).logits)
