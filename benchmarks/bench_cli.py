"""Start-up time of the ``bkn`` CLI: ``bkn --help`` and ``bkn parity --help`` (goal: under 0.5 s).

Each command runs in a fresh interpreter (``python -m bkn_export.cli ...``) ``--repeat``
times; the median and the minimum wall time are printed, with ``python -c pass`` as the
floor and, for comparison, ``polygraphy -h`` when Polygraphy is installed. Also checks
that the help paths import no torch, NumPy or onnx.

    python benchmarks/bench_cli.py --repeat 10
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "bkn --help": [sys.executable, "-m", "bkn_export.cli", "--help"],
    "bkn parity --help": [sys.executable, "-m", "bkn_export.cli", "parity", "--help"],
    "bkn export --help": [sys.executable, "-m", "bkn_export.cli", "export", "--help"],
}

HEAVY = ("torch", "numpy", "onnx")


def heavy_modules(argv: list[str]) -> list[str]:
    """Heavy modules imported by ``bkn <argv>`` (run in a fresh interpreter)."""
    code = (
        "import sys, contextlib, io\n"
        "from bkn_export.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return list(eval(out.strip().splitlines()[-1]))  # a printed list of module names


def time_command(command: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    commands = dict(COMMANDS)
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    if polygraphy:
        commands["polygraphy -h"] = [polygraphy, "-h"]
    print(f"{'command':28} {'median s':>9} {'min s':>7}")
    for label, command in commands.items():
        times = time_command(command, args.repeat)
        print(f"{label:28} {statistics.median(times):9.3f} {min(times):7.3f}")
    for argv in (["--help"], ["parity", "--help"]):
        print(f"heavy modules imported by bkn {' '.join(argv)}: {heavy_modules(argv) or 'none'}")


if __name__ == "__main__":
    main()
