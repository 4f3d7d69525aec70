"""The exporter's record of where an ONNX node came from: ``pkg.torch.onnx.name_scopes``.

``torch.onnx.export(..., dynamo=True)`` stores on every node ``repr`` of a list: the
module names from the root (``''``) to the innermost module, then the FX node name, e.g.
``['', 'block1', 'block1.norm1', '_native_batch_norm_legit_no_training_1']``. This is the
one reader of that value (the fold report, the training export's node names and
``runtime``'s localisation use it). Imports nothing heavy.
"""

from __future__ import annotations

import ast

__all__ = ["NAME_SCOPES_KEY", "read_name_scopes"]

#: The node metadata key the dynamo exporter writes.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def read_name_scopes(text: str | None) -> list[str] | None:
    """The list in a ``pkg.torch.onnx.name_scopes`` value, as written (root ``''`` first, FX node name last).

    None when the value is absent or not a list; [] when it cannot be parsed.
    """
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in scopes] if isinstance(scopes, list) else None
