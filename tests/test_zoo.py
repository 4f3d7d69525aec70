"""Real and mimic networks: converted without changing them, trained, exported in both modes, run in ORT.

For every network (``tests/zoo``): random affine parameters (``trained_like``) and running
statistics calibrated on the data that reaches each BatchNorm (``calibrated``: with random
running statistics, efficientnet-pytorch's B0 output did not depend on its input at all),
``convert_batchnorm`` on the example input (its guard checks each layer and the model's
eval outputs; checked here again independently), every BatchNorm replaced, five training
steps at batch 2 with a finite, changing loss; then, per export mode, the output for a
second input must differ by at least 100 x the parity atol (``_assert_input_dependent``:
otherwise no parity check on the network could fail), and the inference-mode and
training-mode ONNX exports are compared with PyTorch in ONNX Runtime
(``runtime.assert_parity``), one test per network and export mode.

Tolerances: the mimics are judged with the float32 defaults. The real networks are deep
enough that PyTorch's own float32 output is not exact to the default's few ulps (geffnet
MobileNetV3-large: 3.3e-5 from its float64 evaluation, failing the default rule on 0.20 %
of its own elements), so each is judged with an explicit tolerance measured on it:
``atol = max(1e-5, 4 * max|r32 - r64|)``, rtol 1e-4 (:mod:`runtime.noise`, docs/runtime.md
"Deep float32 networks"). The same test proves the floor does not pass a real difference,
at both ends of the feature path: the export with its last weight tensor scaled by
1 + 1e-3 (inference) or 1 + 1e-2 (training, see ``_TAMPER``), and the export with its first
weight tensor (the stem) scaled element-wise by 1 ± 1e-2 (random signs, ``_EARLY_TAMPER``),
must each fail under it.
The small mimics and four real networks run in the default suite (MobileNetV3 and
EfficientNet-B0 without their training-mode export); the rest under ``-m slow``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import Tensor, nn
from zoo.mimics import MIMICS, calibrated, trained_like
from zoo.networks import NETWORKS, ZooNetwork

import runtime
from bkn_export import convert_batchnorm
from bkn_export.conversion_guard import tolerance_for
from bkn_export.nn import _BatchKalmanNorm
from runtime.backends.torch_eager import TorchEagerBackend
from runtime.compare import default_tolerance
from runtime.noise import noise_tolerance, reference_noise

_RUNTIMES = ["ort:cpu:all"]
#: Relative change of the tampered weight that the measured tolerance must catch, per export mode.
#: Training mode at batch 2 is ill-conditioned (layers with 1x1 spatial maps normalise two
#: values per channel): geffnet MobileNetV3-small's float32 reference is 3.0e-4 from its
#: float64 evaluation (output |max| 0.93), and scaling its classifier by 1 + 1e-3 moves the
#: output by at most 9.3e-4, the same order as that rounding: no float32 comparison can
#: attribute it to the file. 1e-2 moves it by 9.3e-3, far above the floor.
_TAMPER = {"inference": 1e-3, "training": 1e-2}
#: Relative element-wise perturbation (random signs) of the first weight tensor that must fail parity.
_EARLY_TAMPER = 1e-2
#: max|f(x1) - f(x2)| over two N(0, 1) inputs must be at least this many times the parity atol.
_INPUT_DEPENDENCE = 100.0
_LIBRARY = {"monai": "monai", "geffnet": "geffnet", "efficientnet": "efficientnet_pytorch"}


def _train(model: nn.Module, shape: tuple[int, ...], steps: int = 5) -> list[float]:
    """``steps`` SGD steps (lr 1e-2) on random inputs of ``shape`` (batch 2); the losses.

    The loss is smooth-L1 of the output against zero: its gradient is bounded, so five
    steps at this learning rate stay finite for BatchNorm and BKN alike (a mean square
    sends ResNet-50's BatchNorm loss to 2.6e12 in five steps, BKN's to NaN).
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        output = model(torch.randn(shape))
        output = (output[0] if isinstance(output, (tuple, list)) else output).float()
        loss = nn.functional.smooth_l1_loss(output, torch.zeros_like(output))
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def _converted_and_trained(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, Tensor]:
    """Calibrate, convert (guard on), check the eval outputs independently, train five steps; (model, input)."""
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert batchnorms > 0
    model = calibrated(trained_like(model), shape).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
    converted = convert_batchnorm(model, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, _BatchKalmanNorm) for m in converted.modules()) == batchnorms
    with torch.no_grad():
        actual = converted.eval()(x)
    tolerance = tolerance_for(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=tolerance.rtol, atol=tolerance.atol)

    losses = _train(converted, shape)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[0] != losses[-1]
    return converted, x


def _network_params() -> list[object]:
    params: list[object] = []
    for network in NETWORKS:
        for mode in ("inference", "training"):
            slow = network.slow or (mode == "training" and network.slow_training_export)
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(network, mode, id=f"{network.name}-{mode}", marks=marks))
    return params


@pytest.mark.parametrize(("network", "mode"), _network_params())
def test_zoo_network_converts_trains_and_exports(network: ZooNetwork, mode: str, tmp_path: Path) -> None:
    library = next(module for prefix, module in _LIBRARY.items() if network.name.startswith(prefix))
    pytest.importorskip(library, reason=f"{library} is in the `test` extra (geffnet: pip install --no-deps geffnet)")
    converted, x = _converted_and_trained(network.build(), network.input_shape)
    (noise,) = reference_noise(converted, [x.numpy()], mode).values()
    tolerance = noise_tolerance(noise)
    _assert_input_dependent(converted, x, mode, tolerance.atol)
    path = tmp_path / f"{network.name}_{mode}.onnx"
    runtime.assert_parity(
        converted, x, mode=mode, runtimes=_RUNTIMES, atol=tolerance.atol, rtol=tolerance.rtol, export_to=path
    )
    tampers = {
        f"last weight x (1 + {_TAMPER[mode]:g})": _scaled_last_weight(path, tmp_path / "last.onnx", _TAMPER[mode]),
        f"first weight x (1 +- {_EARLY_TAMPER:g})": _perturbed_first_weight(path, tmp_path / "first.onnx"),
    }
    for what, tampered in tampers.items():
        report = runtime.run_parity(
            converted, tampered, [x.numpy()], mode=mode, runtimes=_RUNTIMES, atol=tolerance.atol,
            rtol=tolerance.rtol, localise_failures=False,
        )  # fmt: skip
        assert not report.passed, f"{what} passed under atol={tolerance.atol:.3g} ({noise})"


def _assert_input_dependent(model: nn.Module, x: Tensor, mode: str, atol: float) -> None:
    """The reference's output for a second N(0, 1) input differs from that for ``x`` by >= 100 · atol somewhere.

    A network whose output does not depend on its input (activations collapsed before the
    head) passes parity whatever its feature path computes; this makes the parity and
    tamper checks below able to fail. ``mode`` as in :func:`runtime.run_parity`.
    """
    reference = TorchEagerBackend(model, mode)
    (first,) = reference.run({"input_0": x.numpy()}).values()
    (second,) = reference.run({"input_0": torch.randn_like(x).numpy()}).values()
    spread = float(np.abs(first - second).max())
    assert spread >= _INPUT_DEPENDENCE * atol, (
        f"{mode} output barely depends on the input: max|f(x1) - f(x2)| = {spread:.3g} < "
        f"{_INPUT_DEPENDENCE:g} x atol {atol:.3g} (max|f| = {np.abs(first).max():.3g}); a parity check cannot fail"
    )


def _perturbed_first_weight(source: Path, target: Path, relative: float = _EARLY_TAMPER) -> Path:
    """``source`` with its first weight (the >= 2-D initializer used first: the stem) perturbed element-wise.

    Each element is scaled by 1 + relative or 1 - relative (random signs, seed 0): unlike a
    uniform scale, which a following normalization in training mode largely divides out
    (batch statistics), this changes the direction of every filter, so it shows after any
    normalization. It tests the whole feature path, from the first layer on.
    """
    model = onnx.load(source)
    tensor = min(_weights(model, source), key=lambda item: item[0])[1]
    array = numpy_helper.to_array(tensor)
    signs = np.random.default_rng(0).choice(np.array([-1.0, 1.0], dtype=np.float32), size=array.shape)
    perturbed = (array * (1 + np.float32(relative) * signs)).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(perturbed, tensor.name))
    onnx.save(model, target)
    return target


def _weights(model: onnx.ModelProto, source: Path) -> list[tuple[int, onnx.TensorProto]]:
    """(index of the first node that reads it, tensor) for every >= 2-D initializer the graph reads."""
    first_use: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            first_use.setdefault(name, index)
    weights = [(first_use[t.name], t) for t in model.graph.initializer if len(t.dims) >= 2 and t.name in first_use]
    assert weights, f"no weight initializer in {source}"
    return weights


def _scaled_last_weight(source: Path, target: Path, relative: float) -> Path:
    """``source`` with its last weight (the >= 2-D initializer used last in the graph) scaled by ``1 + relative``.

    The last layer's weight has the least depth after it to amplify the change (on
    MobileNetV3-large a 1e-3 change moves the output by 2.5e-3 for the last block's
    projection up to 0.12 for the stem), so it is the hardest honest tamper to see.
    """
    model = onnx.load(source)
    tensor = max(_weights(model, source), key=lambda item: item[0])[1]
    array = numpy_helper.to_array(tensor) * np.float32(1 + relative)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
    onnx.save(model, target)
    return target


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("name", list(MIMICS))
def test_mimic_network_converts_trains_and_exports(name: str, mode: str) -> None:
    build, shape = MIMICS[name]
    converted, x = _converted_and_trained(build(), shape)
    _assert_input_dependent(converted, x, mode, default_tolerance("float32").atol)
    runtime.assert_parity(converted, x, mode=mode, runtimes=_RUNTIMES)
