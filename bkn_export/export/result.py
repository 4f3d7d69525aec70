"""What an export returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FoldRecord:
    """One BKN layer and where its eval-mode affine went.

    module: the PyTorch module name; target: the ONNX node it was folded into (None when
    it was emitted on its own); kind: "conv" | "conv_transpose" | "gemm" | "matmul" |
    "standalone"; detail: a human-readable reason.
    """

    module: str
    target: str | None
    kind: str
    detail: str = ""


@dataclass
class ExportResult:
    """path: the written .onnx; opset: default-domain opset; mode: "inference" | "training"."""

    path: Path
    opset: int
    mode: str
    fold_report: list[FoldRecord] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
