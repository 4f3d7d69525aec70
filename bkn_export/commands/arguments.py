"""Argument types shared by the ``bkn`` subcommands (argparse ``type=`` callables).

Each raises :class:`argparse.ArgumentTypeError` with what was expected, so argparse
prints a usage error and exits 2 (the exit-code rule's "bad option"). Imports nothing
heavy: ``bkn <command> --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import math
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "finite_float_in",
    "nonempty_path",
    "nonnegative_int",
    "parse_factory_arg",
    "parse_named_shape",
    "parse_shape",
    "positive_float",
    "positive_int",
]

_Number = TypeVar("_Number", int, float)

#: Largest single dimension accepted in a shape (ONNX and the runtimes index with int64,
#: but no real example input comes near this; a typo such as 1000000000 is caught here).
MAX_DIMENSION = 2**31 - 1


def nonempty_path(text: str) -> str:
    """An output path as given; an empty or blank one (an unset shell variable: ``--out "$DIR"``) is refused, where it
    would have meant the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?): name where to write")
    return text


def parse_shape(text: str, option: str = "--input-shape") -> tuple[int, ...]:
    """'1,1,8,8' (or '1x1x8x8', no commas) -> (1, 1, 8, 8); every entry an integer in 1..2**31-1.

    Every part between separators must be an integer: '2,x,8' or '2,,8' is refused naming
    the bad part (no part is skipped, so a typo cannot silently drop a dimension). option:
    the flag the text came from, named in the error.
    """
    parts = [part.strip() for part in text.split("," if "," in text else "x")]
    bad = [part for part in parts if not part.lstrip("+-").isdigit()]
    if text.strip() and bad:
        shown = ", ".join(repr(part) for part in bad)
        raise argparse.ArgumentTypeError(
            f"{option} {text!r}: part(s) {shown} are not integers; expected positive integers like 1,3,32,32"
        )
    shape = tuple(int(part) for part in parts) if text.strip() else ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"{option} {text!r}: expected positive integers like 1,3,32,32")
    if any(d > MAX_DIMENSION for d in shape):
        raise argparse.ArgumentTypeError(f"{option} {text!r}: a dimension exceeds {MAX_DIMENSION}")
    return shape


def parse_named_shape(text: str, option: str = "--input-shape") -> tuple[str | None, tuple[int, ...]]:
    """'x:2,1,8,8' -> ('x', (2, 1, 8, 8)); '2,1,8,8' -> (None, (2, 1, 8, 8)) (inputs in order)."""
    name, sep, shape = text.rpartition(":")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"{option} {text!r}: expected NAME:SHAPE or SHAPE, e.g. x:1,3,32,32")
    return (name if sep else None), parse_shape(shape, option)


def parse_factory_arg(text: str) -> tuple[str, Any]:
    """'width=32' -> ('width', 32); values are Python literals, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--factory-arg {text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _number(text: str, kind: type[_Number], what: str, accept: Callable[[_Number], bool], rule: str) -> _Number:
    """``kind(text)``, or an ArgumentTypeError: "expected <what>, got '<text>'" / "'<text>' <rule>: expected <what>"."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r} {rule}: expected {what}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, "a positive integer", lambda v: v >= 1, "must be > 0")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0, "must be >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0, "must be > 0")


def finite_float_in(text: str, what: str, low: float, high: float = math.inf) -> float:
    """A finite number in [low, high]; the error names ``what`` (an option or a part of one)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        expected = f"a finite number >= {low:g}" if high == math.inf else f"a number in [{low:g}, {high:g}]"
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected {expected}")
    return value
