"""CLI contract: help lists the verbs; user mistakes give one line on stderr, non-zero exit, no
traceback and nothing written at --out."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mquant.cli", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


def assert_one_line_error(result, needle):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("quantize", "eval", "info", "demo", "ablate", "generate", "export"):
        assert command in result.stdout


def test_missing_model_path(tmp_path):
    out = tmp_path / "out"
    result = run_cli("quantize", str(tmp_path / "no-such-model"), "--out", str(out))
    assert_one_line_error(result, "does not exist")
    assert not out.exists()


def test_unknown_architecture(tmp_path):
    model_dir = tmp_path / "weird"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    out = tmp_path / "out"
    result = run_cli("quantize", str(model_dir), "--out", str(out), "--method", "rtn")
    assert_one_line_error(result, "unknown architecture")
    assert not out.exists()


@pytest.mark.parametrize("scheme,needle", [("w3a8", "bit width"), ("w8a4", "activation bit width"), ("int8", "wXaY")])
def test_bad_scheme(tmp_path, scheme, needle):
    out = tmp_path / "out"
    result = run_cli("quantize", "--scheme", scheme, "--out", str(out))
    assert_one_line_error(result, needle)
    assert not out.exists()


def test_unknown_method(tmp_path):
    result = run_cli("quantize", "--method", "awq", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "unknown method")


def test_not_a_model_directory(tmp_path):
    result = run_cli("info", str(tmp_path))
    assert_one_line_error(result, "neither mquant_config.json nor config.json")
