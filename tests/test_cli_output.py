"""Human output on a pipe or a file is plain text, never wrapped: a table row stays one line however
long it is. The heavy call of each command is replaced by a canned result (the formatting is what is
under test), so this runs in well under a second."""

import io
import json

import pytest
from typer.testing import CliRunner

import mquant.cli as cli
from mquant.eval.ablation import VariantResult, markdown_table
from mquant.eval.bench import bench_text

LONG = "variant-with-a-very-long-name-" * 6  # 180 characters: far past any terminal width


def _rows() -> list[VariantResult]:
    return [VariantResult("float", "fp32", 1.0, 0.0, 1.0, 626_498_304, 0.0, 1.0),
            VariantResult(LONG, "w4a8", 0.9875, 0.0016, 0.998, 292_591_872, 42.0, 3.0)]


def _bench_result() -> dict:
    row = {"variant": LONG, "prefill_ms": 321.5, "decode_tokens_per_s": 23.9, "weight_bytes": 292_694_784,
           "peak_bytes": 293_000_000, "backend": "native"}
    return {"rows": [row], "ratios": {f"prefill_speedup_{LONG}_vs_bf16": 1.17}, "threads": 1}


def _invoke(args: list[str]):
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", ["demo", "ablate"])
def test_markdown_table_rows_stay_one_line_on_a_pipe(monkeypatch, command):
    monkeypatch.setattr(cli, "run_variants", lambda *a, **k: _rows())
    out = _invoke([command, "--limit", "1"])
    assert out == markdown_table(_rows()) + "\n"  # exactly the formatter's text: no wrapping, no rich markup
    lines = out.splitlines()
    assert len(lines) == 2 + len(_rows()) and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert any(line.startswith(f"| {LONG} | w4a8 | 98.75% |") for line in lines)


def test_bench_eval_info_print_plain_on_a_pipe(monkeypatch):
    monkeypatch.setattr(cli, "bench_model", lambda *a, **k: _bench_result())
    assert _invoke(["bench"]) == bench_text(_bench_result()) + "\n"
    assert _invoke(["bench"]).splitlines()[0].startswith(LONG)

    monkeypatch.setattr(cli, "run_eval", lambda *a, **k: {"task": "easy-vqa", "model": LONG, "accuracy": 0.5})
    assert _invoke(["eval"]) == f"task: easy-vqa\nmodel: {LONG}\naccuracy: 0.5\n"

    info = {"class": "LlavaForConditionalGeneration", "source": LONG, "image_token_ids": [1, 2]}
    monkeypatch.setattr(cli, "model_info", lambda *a, **k: dict(info))
    assert _invoke(["info"]) == json.dumps(info, indent=2) + "\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_still_gets_rich(monkeypatch):
    printed = []

    class FakeConsole:
        def print(self, text):
            printed.append(text)

    monkeypatch.setattr(cli, "Console", FakeConsole)
    monkeypatch.setattr(cli.sys, "stdout", _Terminal())
    cli.emit({}, False, "| a | b |")
    assert printed == ["| a | b |"] and cli.sys.stdout.getvalue() == ""
