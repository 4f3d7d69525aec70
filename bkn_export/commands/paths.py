"""Output paths that would destroy a command's own files: checked before a command does any work.

A write replaces its destination (:mod:`bkn_export.atomic`), so an output path that names one of the command's inputs
(``bkn export --checkpoint ck.pt -o ck.pt``, ``bkn parity spec m.onnx --json m.onnx``) or another of its outputs
(``--json r --html r``) would silently replace that file. Paths are compared as the files they reach (symlinks and
``..`` resolved), so two spellings of one file count as one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from bkn_export.errors import OptionError

__all__ = ["check_distinct_paths", "spec_file"]


def spec_file(spec: str | None) -> str | None:
    """The ``.py`` file of a ``path/to/file.py:factory`` model spec, or None (an importable module's spec)."""
    if not spec:
        return None
    module = spec.rpartition(":")[0]
    return module if module.endswith(".py") else None


def check_distinct_paths(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None]) -> None:
    """Raise :class:`OptionError` (exit 2) where an output names an input's file or another output's.

    outputs, inputs: option label (``"-o"``, ``"--checkpoint"``...) → path, or None where not given."""
    owners: dict[str, str] = {}
    for label, path in inputs.items():
        if path:
            owners.setdefault(os.path.realpath(path), label)
    for label, path in outputs.items():
        if not path:
            continue
        resolved = os.path.realpath(path)
        owner = owners.get(resolved)
        if owner is not None:
            raise OptionError(
                f"{label} {path} is the file of {owner}: writing it would replace that file; give another path"
            )
        owners[resolved] = label
