"""The ``bkn`` command line: ``bkn demo | train-demo | export | parity``.

Each subcommand lives in its own module under :mod:`bkn_export.commands` with
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when chosen,
and nothing heavy (torch, NumPy, onnx) is imported before a command runs, so ``bkn
--help`` and ``bkn <command> --help`` are fast. Exit status
(:mod:`bkn_export.commands.exit_codes`): 0 success, 1 the command found a problem with
the model (e.g. a parity mismatch), 2 bad input or environment. A usage error (a missing,
unknown or malformed argument) is one line on stderr, like every other failure, and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

#: subcommand -> (its module, one-line help); the demo's commands need the [demo] extra
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "bkn_export.commands.demo",
        "train a BKN CNN on digits at batch 2, export both modes, run parity, write reports",
    ),
    "train-demo": ("bkn_export.commands.train_demo", "micro-batch benchmark: BatchNorm vs GroupNorm vs BKN on digits"),
    "export": ("bkn_export.commands.export", "export a model (factory + checkpoint) to ONNX"),
    "parity": ("bkn_export.commands.parity", "compare an ONNX model on every runtime against PyTorch"),
}


#: the attribute of the parsed arguments that holds the chosen command's parser (removed before the command runs)
_COMMAND_PARSER = "_command_parser"


def _command_module(command: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(COMMANDS[command][0])


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error reported as the exit-code rule reports a failure: one line,
    ``<prog>: OptionError: <message>``, exit 2, where argparse prints its whole usage text first. Subcommand parsers
    are of this class too (``add_subparsers`` builds them with the parent's class)."""

    #: The tokens after this (sub)command's name, where :func:`build_parser` knows them.
    command_tokens: Sequence[str] = ()

    def error(self, message: str) -> NoReturn:
        from bkn_export.commands.exit_codes import EXIT_BAD_INPUT

        text = "; ".join(part.strip() for part in message.splitlines() if part.strip())
        unknown = self.unknown_options()
        if unknown and message.startswith(("the following arguments are required", "one of the arguments")):
            # argparse checks required arguments before it reports unknown ones: a misspelt option would
            # otherwise read as "required: ..." while the user did pass them (under another name).
            text = f"unrecognized arguments: {' '.join(unknown)}; {text}"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: OptionError: {text} (see `{self.prog} --help`)\n")

    def unknown_options(self) -> list[str]:
        """The tokens of :attr:`command_tokens` that look like options this parser does not have (argparse's
        abbreviations of a long option count as known; a negative number is a value, not an option)."""
        unknown: list[str] = []
        for token in self.command_tokens:
            if token == "--":
                break
            if not token.startswith("-") or token == "-" or _NEGATIVE_NUMBER.match(token):
                continue
            name = token.split("=", 1)[0]
            short_with_value = not token.startswith("--") and token[:2] in self._option_string_actions  # -oPATH
            known = (
                short_with_value
                or name in self._option_string_actions
                or (
                    self.allow_abbrev
                    and name.startswith("--")
                    and any(o.startswith(name) for o in self._option_string_actions)
                )
            )
            if not known:
                unknown.append(token)
        return unknown


_NEGATIVE_NUMBER = re.compile(r"-\d|-\.\d")


class _Version(argparse.Action):
    """``--version``: the package version, read from its metadata only when asked (~0.1 s)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from bkn_export._version import package_version

        print(f"bkn-export {package_version()}")
        parser.exit()


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="bkn", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action=_Version, nargs=0, help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            sub_parser.command_tokens = list(argv[list(argv).index(name) + 1 :])
            _command_module(name).add_arguments(sub_parser)
            sub_parser.set_defaults(**{_COMMAND_PARSER: sub_parser})  # for main's usage errors, under its name
    return parser


def _exit_on_terminate(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``, ``docker stop``, a cancelled CI job) as an exit, 128 + 15: the writes under way unwind
    and remove their temporaries (:mod:`bkn_export.atomic`), which the default action would leave behind."""
    raise SystemExit(128 + signum)


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as one line, ``bkn: <Category>: <message>``: without the default's second line, the source
    line of the code that warned (``super()._load_from_state_dict(``), which tells a CLI user nothing."""
    del filename, lineno, line
    return f"bkn: {category.__name__}: {message}\n"


def _own_the_process() -> None:
    """Where this CLI owns the process (its entry point, not ``main([...])`` called from a program): handle
    SIGTERM if nothing else handles it yet, and print warnings as one line each."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, _exit_on_terminate)
    warnings.formatwarning = format_warning


#: Options whose value may start with a minus sign (a negative number): ``--val-range -1,1``; and the numeric options,
#: whose own check names a negative value (argparse takes ``--rtol -1e-3`` for a missing value: its exponent).
_SIGNED_VALUE_OPTIONS = frozenset(
    {
        "--input-shape", "--shape-set", "--val-range", "--atol", "--rtol", "--cosine-min", "--error-quantile",
        "--max-mismatch", "--lr",
    }
)  # fmt: skip
#: Of those, the ones that take several values (``nargs="+"``): ``--val-range -1,1 y:0,2``.
_SIGNED_LIST_OPTIONS = frozenset({"--val-range"})
_SIGNED_VALUE = re.compile(r"-(?:[\d.\[]|inf)", re.IGNORECASE)
#: A ``--val-range`` value: ``[NAME:]LO,HI`` or ``NAME:[LO,HI]`` (numbers, inf, nan). Only such tokens are attached as
#: its further values, so ``--val-range -1,1 MODEL.onnx`` leaves the positional where it is.
_NUMBER = r"\s*[-+]?(?:\d|\.\d|inf|nan)[^,\]]*"
_VAL_RANGE_VALUE = re.compile(rf"(?:[^:,\[\]]+:)?\[?{_NUMBER},{_NUMBER}\]?", re.IGNORECASE)


def _signed_option(token: str) -> str | None:
    """The option of :data:`_SIGNED_VALUE_OPTIONS` that ``token`` names, in full or abbreviated as argparse allows
    (``--val``); None for any other token."""
    if not token.startswith("--") or "=" in token or len(token) < 3:
        return None
    matches = [option for option in _SIGNED_VALUE_OPTIONS if option.startswith(token)]
    return matches[0] if len(matches) == 1 else None


def attach_signed_values(argv: Sequence[str]) -> list[str]:
    """``--val-range -1,1`` -> ``--val-range=-1,1`` for the options of :data:`_SIGNED_VALUE_OPTIONS`.

    argparse takes a value that starts with '-' for an option unless it is a single number, so
    ``--val-range -1,1`` failed with "expected one argument" and ``--input-shape -1,3,8,8`` never reached
    the shape's own check; attached, the value reaches its parser (which accepts or refuses it, naming it).
    An option that takes several values (``--val-range -1,1 -2,2 y:0,2``) gets each following token that reads as
    one of its values attached (``action="extend"`` joins them); the first other token (an option, ``--``, a
    positional such as ``MODEL.onnx``) ends them, where argparse would have taken a positional as a value too."""
    out: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "--":
            out.extend(tokens[index:])
            break
        option = _signed_option(token)
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        listed = option in _SIGNED_LIST_OPTIONS and _VAL_RANGE_VALUE.fullmatch(following) is not None
        if option is not None and (_SIGNED_VALUE.match(following) or listed):
            out.append(f"{token}={following}")
            index += 2
            while option in _SIGNED_LIST_OPTIONS and index < len(tokens):
                value = tokens[index]
                if not _VAL_RANGE_VALUE.fullmatch(value):  # an option, "--", or a positional such as MODEL.onnx
                    break
                out.append(f"{token}={value}")
                index += 1
            continue
        out.append(token)
        index += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        _own_the_process()
    argv = attach_signed_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    command_parser: argparse.ArgumentParser = vars(args).pop(_COMMAND_PARSER, parser)
    module = _command_module(args.command)
    # argparse cannot split one variable-length positional around options
    # (`bkn parity SPEC --checkpoint C MODEL.onnx`); a command that takes such a list
    # names its attribute in POSITIONAL_LIST and gets the leftover positionals appended.
    target: str | None = getattr(module, "POSITIONAL_LIST", None)
    if extras and (target is None or any(e.startswith("-") for e in extras)):
        command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras and target is not None:
        getattr(args, target).extend(extras)
    return int(module.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
