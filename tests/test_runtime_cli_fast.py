"""`bkn --help` and `bkn parity --help` start without torch, NumPy or onnx (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "openvino", "polygraphy")
#: Options `bkn parity --help` must list.
OPTIONS = (
    "--load-inputs", "--save-outputs", "--load-outputs", "--check-error-stat", "--shape-set", "--val-range",
    "--iterations", "--repro", "--openvino-precision", "--max-mismatch", "--cosine-min",
)  # fmt: skip


@pytest.mark.parametrize("argv", [["--help"], ["parity", "--help"]], ids=["bkn", "bkn-parity"])
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    code = (
        "import sys, contextlib, io\n"
        "from bkn_export.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "assert 'usage: bkn' in out.getvalue()\n"
        f"assert all(option in out.getvalue() for option in {OPTIONS if argv[0] == 'parity' else ()!r})\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
