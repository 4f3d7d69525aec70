"""Specification: a ``bkn`` usage error follows the exit-code rule of every failure (README "Exit codes").

One line on stderr, ``bkn <command>: OptionError: <what is wrong>``, no usage text, exit 2; for every subcommand.
``bkn export --mode training`` of a model without BKN layers is such a bad input (exit 2), not a model problem.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bkn_export.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``bkn argv``; argparse's exits count as their SystemExit code."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "prefix", "fragment"),
    [
        ([], "bkn:", "the following arguments are required: command"),
        (["bogus"], "bkn:", "invalid choice: 'bogus'"),
        (["export"], "bkn export:", "the following arguments are required: spec, -o/--output"),
        (["export", "m:f", "-o", "m.onnx"], "bkn export:",
         "one of the arguments --input-shape --load-inputs is required"),
        (["export", "m:f", "--input-shape", "1,q", "-o", "m.onnx"], "bkn export:", "'q' are not integers"),
        (["export", "m:f", "--input-shape", "1,2", "-o", "m.onnx", "--mode", "bad"], "bkn export:", "--mode"),
        (["parity", "m.onnx", "--atol", "nan"], "bkn parity:", "argument --atol"),
        (["parity", "m.onnx", "--no-such-option"], "bkn parity:", "unrecognized arguments: --no-such-option"),
        (["demo", "--no-such-option"], "bkn demo:", "unrecognized arguments: --no-such-option"),
        (["export", "--no-such-option", "-1"], "bkn export:",
         "unrecognized arguments: --no-such-option; the following arguments are required: -o/--output"),
        (["export", "m:f", "-o", "m.onnx", "--input-shapes", "1,2"], "bkn export:",
         "unrecognized arguments: --input-shapes; one of the arguments --input-shape --load-inputs is required"),
        (["train-demo", "--epochs", "-1"], "bkn train-demo:", "argument --epochs"),
        (["parity", "m.onnx", "--seed", "-3"], "bkn parity:", "argument --seed: '-3' must be >= 0"),
        (["demo", "--seed", "-1"], "bkn demo:", "argument --seed: '-1' must be >= 0"),
    ],
    ids=["no-command", "unknown-command", "export-missing", "export-examples-missing", "export-shape",
         "export-choice", "parity-value", "parity-unknown", "demo-unknown", "export-unknown-and-missing",
         "export-misspelt-examples", "train-demo-value", "parity-seed", "demo-seed"],
)  # fmt: skip
def test_usage_error_is_one_line_and_exit_2(
    argv: list[str], prefix: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix} OptionError: "), lines[0]
    assert fragment in lines[0]
    assert "usage:" not in err


def test_a_short_option_with_its_value_attached_is_not_called_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["export", "m:f", "-omodel.onnx"], capsys)
    assert code == 2
    assert "unrecognized" not in err and "one of the arguments --input-shape --load-inputs is required" in err


def test_help_still_prints_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["export", "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: bkn export") and "--input-shape" in out
    assert err == ""


def test_training_export_of_an_unconverted_model_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "plain_models.py"
    source.write_text(
        textwrap.dedent(
            """
            from torch import nn
            def plain():
                return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            """
        )
    )
    output = tmp_path / "m.onnx"
    argv = ["export", f"{source}:plain", "--input-shape", "2,1,8,8", "-o", str(output), "--mode", "training"]
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bkn export: OptionError: --mode training:")
    assert "has no BatchKalmanNorm layers" in lines[0] and "convert_batchnorm" in lines[0]
    assert not output.exists()


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``bkn --version`` reported a missing command."""
    from bkn_export._version import package_version

    code, out, err = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"bkn-export {package_version()}" and not err
