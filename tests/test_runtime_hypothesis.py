"""Random small architectures, both export modes, every available runtime: no mismatch goes unnoticed.

Hypothesis draws a network (convolutions, residual blocks, linear layers; BKN after any of
them or not; ReLU or not), a batch size 1-8 and an input; the network is wired into a
Kalman chain, its running statistics moved away from 0 / 1 by two train-mode passes,
exported with ``export_onnx`` in both modes and checked with ``run_parity`` on every
available runtime. A failure shows the runtime, the error and the first diverging module.

Default suite: a few examples; ``-m slow`` runs the larger profile.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn

from bkn_export import BatchKalmanNorm1d, BatchKalmanNorm2d, wire_chain
from bkn_export.errors import BKNInputError
from bkn_export.export import export_onnx
from runtime.assertions import failure_message
from runtime.parity import run_parity


class _Residual(nn.Module):
    def __init__(self, channels: int, bkn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not bkn)
        self.norm1 = BatchKalmanNorm2d(channels) if bkn else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not bkn)
        self.norm2 = BatchKalmanNorm2d(channels) if bkn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(out)))


@st.composite
def architectures(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    conv_blocks = draw(
        st.lists(
            st.tuples(st.sampled_from(["conv", "residual"]), st.integers(2, 6), st.booleans(), st.booleans()),
            min_size=1,
            max_size=3,
        )
    )
    linear_blocks = draw(st.lists(st.tuples(st.integers(2, 8), st.booleans(), st.booleans()), max_size=2))
    if not any(block[2] for block in conv_blocks) and not any(block[1] for block in linear_blocks):
        kind, width, _, relu = conv_blocks[0]  # the training-mode export needs at least one BKN layer
        conv_blocks[0] = (kind, width, True, relu)
    return {
        "in_channels": draw(st.integers(1, 3)),
        "size": draw(st.sampled_from([4, 5, 6])),
        "conv": conv_blocks,
        "linear": linear_blocks,
        "batch": draw(st.integers(1, 8)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(spec: dict) -> nn.Module:  # type: ignore[type-arg]
    """conv/residual blocks -> flatten -> linear blocks -> Linear(., 3)."""
    torch.manual_seed(spec["seed"])
    layers: list[nn.Module] = []
    channels = spec["in_channels"]
    for kind, width, bkn, relu in spec["conv"]:
        if kind == "residual":
            if channels != width:
                layers.append(nn.Conv2d(channels, width, 1))
            layers.append(_Residual(width, bkn))
        else:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not bkn))
            if bkn:
                layers.append(BatchKalmanNorm2d(width))
            if relu:
                layers.append(nn.ReLU())
        channels = width
    layers.append(nn.Flatten())
    features = channels * spec["size"] ** 2
    for width, bkn, relu in spec["linear"]:
        layers.append(nn.Linear(features, width, bias=not bkn))
        if bkn:
            layers.append(BatchKalmanNorm1d(width))
        if relu:
            layers.append(nn.ReLU())
        features = width
    layers.append(nn.Linear(features, 3))
    model = nn.Sequential(*layers)
    example = torch.randn(max(spec["batch"], 2), spec["in_channels"], spec["size"], spec["size"])
    if any(isinstance(m, (BatchKalmanNorm1d, BatchKalmanNorm2d)) for m in model.modules()):
        wire_chain(model, example)
    model.train()
    with torch.no_grad():  # move running statistics away from 0 / 1 so that folding is not trivially exact
        for _ in range(2):
            model(3 * torch.randn_like(example) + 1)
    return model


def _one_value_per_channel_at_the_head(model: nn.Module, batch: int) -> bool:
    """Whether a layer without a predecessor in its chain (so no prior) sees one value per channel in a train-mode
    step: a BatchKalmanNorm1d on (1, C) that heads its chain. nn.BatchNorm1d refuses that input, and so does BKN's
    layer (with the fallback rule off; layers a wired predecessor feeds accept it)."""
    return batch == 1 and any(
        isinstance(m, BatchKalmanNorm1d) and not m.has_predecessor and m.options.fallback_ratio == 0
        for m in model.modules()
    )


def check_architecture(spec: dict) -> None:  # type: ignore[type-arg]
    model = build(spec)
    refused_in_training = _one_value_per_channel_at_the_head(model, spec["batch"])
    x = (
        np.random.default_rng(spec["seed"])
        .standard_normal((spec["batch"], spec["in_channels"], spec["size"], spec["size"]))
        .astype(np.float32)
    )
    with tempfile.TemporaryDirectory(prefix="bkn-hypothesis-") as tmp:
        for mode in ("inference", "training"):
            path = Path(tmp) / f"{mode}.onnx"
            if mode == "training" and refused_in_training:
                with pytest.raises(BKNInputError, match="more than 1 value per channel when training"):
                    export_onnx(model, (torch.from_numpy(x),), path, mode=mode)
                assert not path.exists(), "a refused export left a file behind"
                continue
            export_onnx(model, (torch.from_numpy(x),), path, mode=mode)
            report = run_parity(model, path, [x], mode=mode, runtimes="all")
            assert report.ran, "no runtime ran"
            assert report.passed, f"{spec}\n{failure_message(report)}"


# No shrinking: each example costs two exports (seconds); the failure message carries the spec.
_COMMON = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
)


@settings(_COMMON, max_examples=2)
@given(architectures())
# The slow profile's example 2026-12-07: the chain's head is a BatchKalmanNorm1d at batch 1 (refused in training);
# and a BatchKalmanNorm1d that heads its own chain after a residual block whose layers head another.
@example(
    {
        "in_channels": 1,
        "size": 4,
        "conv": [("residual", 3, False, False)],
        "linear": [(4, True, True), (3, True, False)],
        "batch": 1,
        "seed": 2,
    }
)
@example(
    {
        "in_channels": 2,
        "size": 4,
        "conv": [("residual", 3, True, False)],
        "linear": [(4, True, True), (3, True, False)],
        "batch": 1,
        "seed": 5,
    }
)
def test_random_architectures_agree_on_every_runtime(spec: dict) -> None:  # type: ignore[type-arg]
    check_architecture(spec)


@pytest.mark.slow
@settings(_COMMON, max_examples=30)
@given(architectures())
def test_random_architectures_agree_on_every_runtime_large_profile(spec: dict) -> None:  # type: ignore[type-arg]
    check_architecture(spec)
