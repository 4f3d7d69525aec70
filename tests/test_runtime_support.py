"""Shared models for the runtime tests (no tests here): exported once per test session.

Exports cost seconds each on a shared 2-core machine, so the digits network is trained
a few steps (running statistics away from their initial 0 / 1, so folding is not
trivially exact) and exported once per mode, cached for every runtime test module.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bkn_export.demo.models import digits_resnet
from bkn_export.export import export_onnx

_WORKDIR = Path(tempfile.mkdtemp(prefix="bkn-runtime-tests-"))


@functools.cache
def trained_digits() -> Any:  # a DigitsResNet (Any: tests reach into its submodules)
    """A digits_resnet('bkn') after 3 train-mode steps at batch 2 (statistics and chain exercised)."""
    torch.manual_seed(0)
    model = digits_resnet("bkn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        loss = model(torch.randn(2, 1, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@functools.cache
def exported_digits(mode: str) -> Path:
    """``trained_digits()`` exported with ``export_onnx(..., mode=mode)`` (dynamic batch)."""
    path = _WORKDIR / f"digits_{mode}.onnx"
    export_onnx(trained_digits(), (torch.randn(2, 1, 8, 8),), path, mode=mode)
    return path


def digits_inputs(batch: int = 4, seed: int = 1) -> list[np.ndarray]:
    return [np.random.default_rng(seed).standard_normal((batch, 1, 8, 8)).astype(np.float32)]


def workdir() -> Path:
    return _WORKDIR
