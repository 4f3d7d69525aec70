"""The Triton BKN kernels compute what bkn_export.functional specifies.

On CPU the launchers run under ``TRITON_INTERPRET=1`` in a child process
(:class:`tests/support/triton_interpreter.InterpreterProcess`; its docstring says why a
child process: Triton fixes compiled-vs-interpreted when the kernel module is
imported, so this process never flips the variable). Every value is compared against
the functional reference evaluated in float64 on the same inputs.

Tolerances: elementwise |kernel - exact| ≤ 1e-5 · max|exact| + rtol |exact| +
4 |same - exact|, where ``exact`` is the reference in float64 and ``same`` the
reference in the kernels' own precision (float32 statistics). The last term admits
what float32 cannot resolve anyway: e.g. with one element per channel (N = 1, no
spatial dims) S = 0 and ∂L/∂p cancels to ~2e-5 of its largest entry in *either*
float32 implementation. rtol:

* float32 results (all statistics and per-channel gradients, and y / grad_x for
  float32 inputs): 1e-5. The kernels accumulate in float32 in another order than the
  reference; the observed error is ~5e-7 of the largest entry.
* y and grad_x for float16 / bfloat16 inputs: two units in the last place of the
  output dtype (2⁻⁹ / 2⁻⁶): both sides compute in float32 (float64) and round once,
  so they may land on neighbouring representable values.

The default suite runs a representative grid (~30-50 s on a shared 2-core machine); ``-m sweep`` runs the full one
(N ∈ {1, 2, 3, 8}, C from 1 to 512, odd spatial sizes, both layouts, three dtypes).
Tests marked ``gpu`` run the registered CUDA kernels through ``torch.ops.bkn`` and the
nn modules against the CPU reference; they skip without a GPU.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import torch
from support.triton_compile import Launch, ScalarReads, compile_for_hopper, record_kernels
from support.triton_interpreter import InterpreterProcess
from torch import Tensor

import bkn_export
from bkn_export import functional as Fk
from bkn_export.demo.models import digits_resnet
from bkn_export.errors import BKNInputError
from bkn_export.kernels import layout

EPS = 1e-5
_OUTPUT_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
_FLOAT32_RTOL = 1e-5


# --------------------------------------------------------------------------- helpers


def assert_matches(actual: Tensor, exact: Tensor, rtol: float, what: str, same: Tensor | None = None) -> None:
    """|actual - exact| ≤ 1e-5 · max|exact| + rtol |exact| + 4 |same - exact| elementwise (module docstring)."""
    actual, exact = actual.double(), exact.double()
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    bound = 1e-5 * float(exact.abs().max()) + rtol * exact.abs()
    if same is not None:
        bound = bound + 4.0 * (same.double() - exact).abs()
    error = (actual - exact).abs()
    failed = ~(error <= bound)  # NaN fails too
    if bool(failed.any()):
        worst = int(torch.where(failed, error - bound, torch.zeros_like(error)).flatten().argmax())
        same_value = f", same-precision reference {float(same.flatten()[worst]):.8g}" if same is not None else ""
        raise AssertionError(
            f"{what}: {int(failed.sum())} of {failed.numel()} elements out of tolerance; worst at flat index "
            f"{worst}: kernel {float(actual.flatten()[worst]):.8g}, float64 reference "
            f"{float(exact.flatten()[worst]):.8g}{same_value}, allowed error {float(bound.flatten()[worst]):.3g}"
        )


@dataclass(frozen=True)
class Case:
    """One input configuration: x of ``shape`` in ``dtype``, laid out channels-first or channels-last."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False

    def __str__(self) -> str:
        layout_name = "NHWC" if self.channels_last else "NCHW"
        return f"{'x'.join(map(str, self.shape))}-{str(self.dtype).removeprefix('torch.')}-{layout_name}"


def _to_layout(t: Tensor, channels_last: bool) -> Tensor:
    if not channels_last or t.dim() < 3:
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.movedim(1, -1).contiguous().movedim(-1, 1)  # (N, C, L) with channels innermost


@dataclass
class Inputs:
    x: Tensor
    prior_mean: Tensor
    prior_variance: Tensor
    prior_weight: Tensor
    weight: Tensor | None
    bias: Tensor | None
    grad_output: Tensor
    grad_posterior_mean: Tensor
    grad_posterior_variance: Tensor

    def forward_args(self, fallback_ratio: float = 0.0) -> tuple[object, ...]:
        return (
            self.x,
            self.prior_mean,
            self.prior_variance,
            self.prior_weight,
            self.weight,
            self.bias,
            EPS,
            fallback_ratio,
        )

    def backward_args(self, fallback_ratio: float = 0.0) -> tuple[object, ...]:
        return (
            self.grad_output,
            self.grad_posterior_mean,
            self.grad_posterior_variance,
            self.x,
            self.prior_mean,
            self.prior_variance,
            self.prior_weight,
            self.weight,
            EPS,
            fallback_ratio,
        )


def make_inputs(case: Case, affine: bool = True, seed: int = 0) -> Inputs:
    """x ~ 3 + 2·N(0, 1) (a mean away from 0 tests the centring), priors near the batch."""
    generator = torch.Generator().manual_seed(seed)
    channels = case.shape[1]

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator)

    def rand(*size: int) -> Tensor:
        return torch.rand(*size, generator=generator)

    x = _to_layout((3.0 + 2.0 * randn(*case.shape)).to(case.dtype), case.channels_last)
    grad_output = _to_layout(randn(*case.shape).to(case.dtype), case.channels_last)
    return Inputs(
        x=x,
        prior_mean=3.0 + randn(channels),
        prior_variance=4.0 * (0.5 + rand(channels)),
        prior_weight=0.9 * rand(channels),
        weight=randn(channels) if affine else None,
        bias=randn(channels) if affine else None,
        grad_output=grad_output,
        grad_posterior_mean=randn(channels),
        grad_posterior_variance=randn(channels),
    )


def _double(t: object) -> object:
    return t.double() if isinstance(t, Tensor) else t


def reference(function: Any, args: tuple[object, ...]) -> tuple[Any, ...]:
    """The functional reference in float64 on the same inputs."""
    return tuple(function(*(_double(a) for a in args)))


def check_forward(
    interpreter: InterpreterProcess, inputs: Inputs, fallback_ratio: float = 0.0, single_program: bool | None = None
) -> None:
    args = inputs.forward_args(fallback_ratio)
    y, mean, variance = interpreter.call("forward", *args, single_program=single_program)
    exact = reference(Fk.batch_kalman_norm, args)
    same = tuple(Fk.batch_kalman_norm(*args))  # type: ignore[arg-type]
    assert y.dtype == inputs.x.dtype and y.shape == inputs.x.shape
    assert mean.dtype == variance.dtype == torch.float32
    assert_matches(y, exact[0], _OUTPUT_RTOL[inputs.x.dtype], "y", same[0])
    assert_matches(mean, exact[1], _FLOAT32_RTOL, "posterior_mean", same[1])
    assert_matches(variance, exact[2], _FLOAT32_RTOL, "posterior_variance", same[2])


_GRAD_NAMES = ("grad_x", "grad_prior_mean", "grad_prior_variance", "grad_prior_weight", "grad_weight", "grad_bias")


def check_backward(
    interpreter: InterpreterProcess, inputs: Inputs, fallback_ratio: float = 0.0, single_program: bool | None = None
) -> None:
    args = inputs.backward_args(fallback_ratio)
    grads = interpreter.call("backward", *args, single_program=single_program)
    exact = reference(Fk.batch_kalman_norm_backward, args)
    same = Fk.batch_kalman_norm_backward(*args)  # type: ignore[arg-type]
    assert grads[0].dtype == inputs.x.dtype
    for name, actual, wanted, same_precision in zip(_GRAD_NAMES, grads, exact, same):
        if wanted is None:  # no γ: the op returns zeros
            assert name == "grad_weight" and bool((actual == 0).all())
            continue
        rtol = _OUTPUT_RTOL[inputs.x.dtype] if name == "grad_x" else _FLOAT32_RTOL
        assert_matches(actual, wanted, rtol, name, same_precision)


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterProcess]:
    pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")
    with InterpreterProcess() as process:
        yield process


# --------------------------------------------------------------------------- default grid

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
REPRESENTATIVE = [
    Case((2, 3, 5, 7), F32),
    Case((8, 64, 7, 7), F32, channels_last=True),
    Case((3, 130, 3, 5), F16),
    Case((3, 130, 3, 5), F16, channels_last=True),
    Case((1, 512, 3, 3), BF16, channels_last=True),
    Case((2, 20, 9, 11), BF16),
    Case((8, 37), F32),
    Case((2, 1, 9), F32),
    Case((3, 12, 3, 5, 7), F16, channels_last=True),
    Case((1, 2, 200, 200), F32),  # > 1 program per sample, several tiles per program
    Case((2, 3, 101, 103), F32, channels_last=True),  # merged rows, last tile partial
]


_PATHS = {"one-kernel": True, "three-kernel": False}


@pytest.mark.parametrize("path", _PATHS)
@pytest.mark.parametrize("case", REPRESENTATIVE, ids=str)
def test_forward_matches_reference(interpreter: InterpreterProcess, case: Case, path: str) -> None:
    check_forward(interpreter, make_inputs(case), single_program=_PATHS[path])


@pytest.mark.parametrize("path", _PATHS)
@pytest.mark.parametrize("case", REPRESENTATIVE, ids=str)
def test_backward_matches_reference(interpreter: InterpreterProcess, case: Case, path: str) -> None:
    check_backward(interpreter, make_inputs(case), single_program=_PATHS[path])


def test_kernels_floor_the_batch_variance_as_the_reference_does() -> None:
    """The fallback ratio's floor on the batch variance is one number: the kernels' constexpr is the reference's."""
    common = pytest.importorskip("bkn_export.kernels.common", reason="Triton is not installed")
    assert common.VARIANCE_FLOOR.value == Fk._VARIANCE_FLOOR


def test_small_inputs_take_one_kernel_and_large_ones_three() -> None:
    """The size rule of ``layout.use_single_program`` on ResNet-50 shapes (and never with the fallback rule)."""
    small = layout.channel_view(torch.empty(8, 2048, 7, 7))
    large = layout.channel_view(torch.empty(32, 256, 56, 56))
    assert layout.use_single_program(small, fallback_ratio=0.0)
    assert not layout.use_single_program(small, fallback_ratio=100.0)
    assert not layout.use_single_program(large, fallback_ratio=0.0)


def test_one_kernel_path_refuses_the_fallback_rule(interpreter: InterpreterProcess) -> None:
    inputs = make_inputs(Case((2, 3, 4), F32))
    with pytest.raises(BKNInputError, match="fallback rule"):
        interpreter.call("forward", *inputs.forward_args(100.0), single_program=True)


@pytest.mark.parametrize("fires", [True, False], ids=["fires", "holds"])
def test_fallback_rule_matches_reference(interpreter: InterpreterProcess, fires: bool) -> None:
    """mean(Σ_pred / S) ≥ ratio switches every channel to batch statistics and zeroes ∂L/∂p."""
    inputs = make_inputs(Case((4, 40, 5, 3), F32))
    ratio = 1.0 / 3.0 if fires else 3.0  # Σ_pred / S is about 1 here, far from either threshold
    batch_variance = Fk.batch_statistics(inputs.x).variance
    fired = bool((inputs.prior_variance / batch_variance).mean() >= ratio)
    assert fired == fires
    check_forward(interpreter, inputs, ratio)
    check_backward(interpreter, inputs, ratio)
    grad_prior_weight = interpreter.call("backward", *inputs.backward_args(ratio))[3]
    assert bool((grad_prior_weight == 0).all()) == fires


def test_a_nan_channel_does_not_fire_the_fallback_for_the_others(interpreter: InterpreterProcess) -> None:
    """The reference's mean ratio is NaN there (clamp_min passes NaN) and the rule does not fire; a floor that
    swallowed the NaN gave a ratio of ~1e12 and batch statistics in every channel."""
    inputs = make_inputs(Case((4, 6, 5, 3), F32))
    inputs.x[0, 0, 0, 0] = float("nan")
    inputs.prior_variance.mul_(1000.0)  # wide enough that the rule would fire on the finite channels alone
    args = inputs.forward_args(100.0)
    _, mean, variance = interpreter.call("forward", *args)
    expected = Fk.batch_kalman_norm(*args)  # type: ignore[arg-type]
    torch.testing.assert_close(variance[1:], expected[2][1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean[1:], expected[1][1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [Case((4, 24, 5, 3), F32), Case((4, 24, 5, 3), F16, channels_last=True)], ids=str)
def test_without_affine_parameters(interpreter: InterpreterProcess, case: Case) -> None:
    inputs = make_inputs(case, affine=False)
    check_forward(interpreter, inputs)
    check_backward(interpreter, inputs)


def test_variance_is_accurate_for_a_large_mean(interpreter: InterpreterProcess) -> None:
    """x = 10⁴ + 0.1·N(0, 1) in float32: E[x²] - E[x]² would lose every digit; Chan's merge keeps them."""
    x = 1e4 + 0.1 * torch.randn(8, 4, 33, 33)
    zeros = torch.zeros(4)
    _, _, variance = interpreter.call("forward", x, zeros, torch.ones(4), zeros, None, None, EPS, 0.0)
    true_variance = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(variance.double(), true_variance, rtol=1e-5, atol=0.0)


def test_outputs_keep_the_input_layout(interpreter: InterpreterProcess) -> None:
    inputs = make_inputs(Case((2, 6, 5, 7), F16, channels_last=True))
    y, _, _ = interpreter.call("forward", *inputs.forward_args())
    grad_x = interpreter.call("backward", *inputs.backward_args())[0]
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert grad_x.is_contiguous(memory_format=torch.channels_last)


def test_unusual_layout_is_copied_and_restored(interpreter: InterpreterProcess) -> None:
    """A permuted input (neither NCHW nor NHWC) gives the values, and the strides of BatchNorm's output
    (``suggest_memory_format(x)``: contiguous here), which the op's fake promises (tests/test_compile_export.py)."""
    from torch._prims_common import suggest_memory_format

    inputs = make_inputs(Case((3, 5, 6, 7), F32))
    inputs.x = inputs.x.transpose(2, 3)
    inputs.grad_output = inputs.grad_output.transpose(2, 3)
    check_forward(interpreter, inputs)
    check_backward(interpreter, inputs)
    y, _, _ = interpreter.call("forward", *inputs.forward_args())
    layout = torch.empty_like(inputs.x, memory_format=suggest_memory_format(inputs.x)).stride()
    assert y.stride() == layout == torch.nn.functional.batch_norm(inputs.x, None, None, training=True).stride()


def test_grad_output_in_another_layout(interpreter: InterpreterProcess) -> None:
    """grad_output need not share x's layout (it is brought to x's strides once)."""
    inputs = make_inputs(Case((2, 6, 5, 7), F32, channels_last=True))
    inputs.grad_output = inputs.grad_output.contiguous()
    check_backward(interpreter, inputs)


def test_mismatched_channel_count_is_rejected(interpreter: InterpreterProcess) -> None:
    inputs = make_inputs(Case((2, 6, 5), F32))
    inputs.prior_mean = torch.zeros(5)
    with pytest.raises(BKNInputError, match=r"prior_mean must have shape \(6,\)"):
        interpreter.call("forward", *inputs.forward_args())


def test_empty_batch_is_rejected(interpreter: InterpreterProcess) -> None:
    inputs = make_inputs(Case((2, 3, 4), F32))
    inputs.x = inputs.x[:0]
    with pytest.raises(BKNInputError, match="empty"):
        interpreter.call("forward", *inputs.forward_args())


# --------------------------------------------------------------------------- full sweep

_SWEEP_SPATIAL = [(), (5,), (3, 7), (9, 11), (3, 5, 3)]
_SWEEP = [
    Case((n, c, *spatial), dtype, channels_last)
    for n, c, spatial, dtype, channels_last in itertools.product(
        [1, 2, 3, 8], [1, 3, 17, 64, 130, 512], _SWEEP_SPATIAL, [F32, F16, BF16], [False, True]
    )
    if not (channels_last and not spatial) and n * c * math.prod(spatial) <= 300_000
] + [Case((8, 64, 65, 65), F32, channels_last=True)]  # > COMBINE_BLOCK_P partials per channel


@pytest.mark.sweep
@pytest.mark.parametrize("case", _SWEEP, ids=str)
def test_sweep_forward_and_backward(interpreter: InterpreterProcess, case: Case) -> None:
    """Both paths on every case (the size rule alone would send most of these small cases to one)."""
    inputs = make_inputs(case)
    for single_program in (True, False):
        check_forward(interpreter, inputs, single_program=single_program)
        check_backward(interpreter, inputs, single_program=single_program)


# --------------------------------------------------------------------------- ahead-of-time compilation for a GPU


def _recorded_kernel_calls(monkeypatch: pytest.MonkeyPatch, case: Case, fallback_ratio: float, affine: bool) -> list:
    """Run both launchers with every kernel replaced by a recorder; returns (kernel, args, kwargs) per launch."""
    from bkn_export.kernels import backward, forward

    calls: list[Launch] = []
    record_kernels(monkeypatch, (forward, backward), calls)
    inputs = make_inputs(case, affine=affine)
    forward.batch_kalman_norm_forward(*inputs.forward_args(fallback_ratio))  # type: ignore[arg-type]
    backward.batch_kalman_norm_backward(*inputs.backward_args(fallback_ratio))  # type: ignore[arg-type]
    return calls


_COMPILE_DEFAULT = [
    (Case((4, 6, 5, 7), F16, channels_last=True), 2.0, False),  # three kernels + the fallback kernels
    (Case((4, 6, 5, 7), BF16), 0.0, True),  # one kernel each way
]
_COMPILE_ALL = [
    (Case((3, 6, 5, 7), F32), 0.0, True),
    (Case((8, 2048, 7, 7), F16, channels_last=True), 0.0, True),
    (Case((2, 40, 9, 11), BF16), 0.5, True),
    (Case((32, 256, 56, 56), F16, channels_last=True), 0.0, True),
    (Case((32, 64, 56, 56), F32), 0.0, True),
    (Case((8, 37), F32), 0.0, False),
]


def _check_compiles(monkeypatch: pytest.MonkeyPatch, case: Case, fallback_ratio: float, affine: bool) -> None:
    if bkn_export.kernels.triton_installed() is False:
        pytest.skip("the kernels need the triton package (pip install triton)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; kernels are interpreted, not compiled")
    calls = _recorded_kernel_calls(monkeypatch, case, fallback_ratio, affine)
    one_kernel = layout.use_single_program(layout.channel_view(make_inputs(case).x), fallback_ratio)
    assert len(calls) == (2 if one_kernel else 8 if fallback_ratio > 0 else 6)
    for kernel, args, kwargs in calls:
        compiled = compile_for_hopper(kernel, args, dict(kwargs))
        assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"


@pytest.mark.parametrize("fallback_ratio", [0.0, 2.0], ids=["no-rule", "rule"])
def test_launchers_read_no_tensor_value_on_the_host(monkeypatch: pytest.MonkeyPatch, fallback_ratio: float) -> None:
    """Launch decisions (path, grid, the fallback rule's kernels) use shapes and Python floats only.

    Both launchers run with their kernels recorded instead of launched; no tensor value is
    read back (on a GPU that would be a host synchronisation), with or without the rule.
    """
    pytest.importorskip("triton", reason="the launchers import triton (pip install triton)")
    with ScalarReads() as mode:
        calls = _recorded_kernel_calls(monkeypatch, Case((4, 6, 5, 7), F32), fallback_ratio, affine=True)
    assert len(calls) == (8 if fallback_ratio > 0 else 2)
    assert mode.reads == []


@pytest.mark.parametrize(("case", "fallback_ratio", "affine"), _COMPILE_DEFAULT, ids=str)
def test_kernels_compile_for_an_h100(
    monkeypatch: pytest.MonkeyPatch, case: Case, fallback_ratio: float, affine: bool
) -> None:
    """Every kernel the launchers start compiles to an sm_90 cubin (Triton's own ptxas; no GPU needed).

    The interpreter runs the kernels as NumPy; this is what checks that they also pass
    Triton's compiler (types of loop-carried values, constexpr branches, layouts).
    """
    _check_compiles(monkeypatch, case, fallback_ratio, affine)


@pytest.mark.sweep
@pytest.mark.parametrize(("case", "fallback_ratio", "affine"), _COMPILE_ALL, ids=str)
def test_sweep_kernels_compile_for_an_h100(
    monkeypatch: pytest.MonkeyPatch, case: Case, fallback_ratio: float, affine: bool
) -> None:
    _check_compiles(monkeypatch, case, fallback_ratio, affine)


# --------------------------------------------------------------------------- layout (no Triton needed)


def test_channels_first_view_reduces_along_contiguous_rows() -> None:
    view = layout.channel_view(torch.empty(4, 6, 5, 7))
    assert (view.samples, view.channels, view.rows) == (4, 6, 35)
    assert (view.stride_sample, view.stride_channel, view.stride_row) == (210, 35, 1)
    tiling = layout.choose_tiling(view)
    assert tiling.block_rows >= 35 and tiling.block_rows * tiling.block_channels <= layout.TILE_ELEMENTS


def test_channels_last_view_merges_sample_and_spatial_rows() -> None:
    x = torch.empty(4, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    view = layout.channel_view(x)
    assert (view.samples, view.channels, view.rows) == (1, 6, 140)
    assert (view.stride_channel, view.stride_row) == (1, 6)
    assert layout.choose_tiling(view).block_channels == 8  # channels are the contiguous side


def test_host_cdiv_and_next_power_of_2_are_tritons() -> None:
    """The launchers' host helpers give ``triton.cdiv`` / ``triton.next_power_of_2``'s results (their
    ``constexpr_function`` wrappers cost µs per host call), 0 included."""
    triton = pytest.importorskip("triton", reason="compared with triton's own")
    values = [*range(0, 5000), 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 2**40 + 3]
    for value in values:
        assert layout.next_power_of_2(value) == triton.next_power_of_2(value), value
        for denominator in (1, 3, 16, 32, 1024):
            assert layout.cdiv(value, denominator) == triton.cdiv(value, denominator), (value, denominator)


def test_two_dimensional_input_reduces_over_the_batch() -> None:
    view = layout.channel_view(torch.empty(9, 5))
    assert (view.samples, view.channels, view.rows, view.stride_row) == (1, 5, 9, 5)


def test_tiling_covers_every_row_exactly_once() -> None:
    for shape in [(1, 2, 200, 200), (8, 3, 5), (3, 64, 65, 65)]:
        view = layout.channel_view(torch.empty(shape))
        tiling = layout.choose_tiling(view)
        assert tiling.programs_per_sample * tiling.rows_per_program >= view.rows
        assert (tiling.programs_per_sample - 1) * tiling.rows_per_program < view.rows
        assert tiling.row_blocks_per_sample * tiling.block_rows >= view.rows


def test_grids_of_inputs_the_kernels_take_fit_cudas_axis_y_limit() -> None:
    """Up to MAX_CHANNELS channels, the three-kernel path's grids keep axis y (the channel blocks) within CUDA's
    65535 in every layout, one channel per block included; one channel more would not (Triton's interpreter has no
    such limit, a GPU refuses the launch). Meta tensors: shapes and strides only."""
    limit = layout.MAX_CHANNELS
    assert limit == 65535
    for shape, channels_last in [((1, limit, 64, 64), False), ((1, limit, 3), False), ((4, limit), False),
                                 ((2, limit, 3, 3), True)]:  # fmt: skip
        x = torch.empty(shape, device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        view = layout.channel_view(x)
        tiling = layout.choose_tiling(view)
        assert tiling.reduce_grid(view)[1] <= 65535 and tiling.stream_grid(view)[1] <= 65535, shape
    over = layout.channel_view(torch.empty(1, limit + 1, 64, 64, device="meta"))
    assert layout.choose_tiling(over).reduce_grid(over)[1] > 65535


def test_inputs_with_more_channels_than_the_grid_allows_take_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """uses_kernels refuses x with more than MAX_CHANNELS channels (they take the reference), on a device that runs
    the kernels (here a meta tensor standing in for a CUDA one: only its shape is read)."""
    pytest.importorskip("triton", reason="uses_kernels needs the triton package")
    monkeypatch.setattr(bkn_export.kernels, "triton_device", lambda x: True)
    assert bkn_export.kernels.uses_kernels(torch.empty(1, layout.MAX_CHANNELS, 64, 64, device="meta"))
    assert not bkn_export.kernels.uses_kernels(torch.empty(1, layout.MAX_CHANNELS + 1, 64, 64, device="meta"))
    assert not bkn_export.kernels.uses_kernels(torch.empty(4, 5_000_000, device="meta"))


# --------------------------------------------------------------------------- op wiring and compile


def test_cpu_tensors_never_take_the_cuda_kernels() -> None:
    assert not bkn_export.kernels.uses_kernels(torch.empty(2, 3, 4))


def _train_step(model: torch.nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    out = model(x)
    (out.square().mean()).backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _small_chain() -> torch.nn.Sequential:
    """Conv → BN → ReLU → Conv → BN converted to a two-layer Kalman chain (the second has a prior)."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, padding=1),
        torch.nn.BatchNorm2d(5),
    )
    return cast(torch.nn.Sequential, bkn_export.convert_batchnorm(model, torch.randn(2, 3, 6, 6), prior_weight=0.5))


def test_compiled_model_matches_eager_through_the_fake_implementation() -> None:
    """torch.compile traces the opaque op with its fake impl; AOTAutograd uses its autograd formula."""
    torch.manual_seed(0)
    model = _small_chain().train()
    assert model[4].has_predecessor  # the second layer really blends a prior
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    x = torch.randn(4, 3, 6, 6)
    eager_out, eager_grads = _train_step(model, x)
    compiled_out, compiled_grads = _train_step(compiled, x)  # type: ignore[arg-type]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    assert len(compiled_grads) == len(eager_grads) > 0
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- GPU: the registered CUDA path


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """cuDNN convolutions default to TF32 on Ampere+; the CPU comparison needs full float32."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


_GPU_CASES = [
    Case((8, 64, 14, 14), F32),
    Case((8, 64, 14, 14), F16, channels_last=True),
    Case((2, 130, 7, 9), BF16),
    Case((32, 256, 7, 7), F32, channels_last=True),
    Case((3, 17), F32),
]


def _cuda_op_step(inputs: Inputs, device: str, fallback_ratio: float) -> tuple[Tensor, ...]:
    """Forward and backward through torch.ops.bkn on ``device``; returns outputs and grads (on CPU)."""
    leaves = [
        t.detach().to(device).requires_grad_()
        for t in (inputs.x, inputs.prior_mean, inputs.prior_variance, inputs.prior_weight, inputs.weight, inputs.bias)
        if t is not None
    ]
    x, prior_mean, prior_variance, prior_weight, weight, bias = leaves
    y, mean, variance = torch.ops.bkn.batch_kalman_norm(
        x, prior_mean, prior_variance, prior_weight, weight, bias, EPS, fallback_ratio
    )
    torch.autograd.backward(
        (y, mean, variance),
        (
            inputs.grad_output.to(device),
            inputs.grad_posterior_mean.to(device),
            inputs.grad_posterior_variance.to(device),
        ),
    )
    results = [y, mean, variance, *(leaf.grad for leaf in leaves)]
    return tuple(r.detach().cpu() for r in results)  # type: ignore[union-attr]


@pytest.mark.gpu
@pytest.mark.parametrize("fallback_ratio", [0.0, 1.0 / 3.0, 3.0], ids=["no-rule", "rule-fires", "rule-holds"])
@pytest.mark.parametrize("case", _GPU_CASES, ids=str)
def test_cuda_op_matches_cpu_reference(case: Case, fallback_ratio: float) -> None:
    inputs = make_inputs(case)
    assert bkn_export.kernels.uses_kernels(inputs.x.cuda())
    got = _cuda_op_step(inputs, "cuda", fallback_ratio)
    double_inputs = Inputs(**{k: _double(v) for k, v in vars(inputs).items()})  # type: ignore[arg-type]
    exact = _cuda_op_step(double_inputs, "cpu", fallback_ratio)
    same = _cuda_op_step(inputs, "cpu", fallback_ratio)
    names = ["y", "posterior_mean", "posterior_variance", "grad_x", *_GRAD_NAMES[1:]]
    for name, actual, expected, same_precision in zip(names, got, exact, same):
        rtol = _OUTPUT_RTOL[case.dtype] if name in ("y", "grad_x") else _FLOAT32_RTOL
        assert_matches(actual, expected, rtol, name, same_precision)
    assert got[0].stride() == inputs.x.stride() and got[3].stride() == inputs.x.stride()


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
def test_cuda_module_training_step_matches_cpu() -> None:
    """A converted model's train step (outputs, parameter grads, running stats) on CUDA equals the CPU one."""
    torch.manual_seed(0)
    cpu_model = digits_resnet("bkn", width=8).train()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x = torch.randn(8, 1, 16, 16)
    cpu_out, cpu_grads = _train_step(cpu_model, x)
    cuda_out, cuda_grads = _train_step(cuda_model, x.cuda())
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    for got, want in zip(cuda_grads, cpu_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-4)
    for (name, got), (_, want) in zip(cuda_model.named_buffers(), cpu_model.named_buffers()):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
def test_cuda_compiled_model_matches_eager() -> None:
    """Inductor keeps the op opaque and calls the registered Triton kernels at run time."""
    torch.manual_seed(0)
    model = digits_resnet("bkn", width=8).cuda().train()
    compiled = torch.compile(copy.deepcopy(model))
    x = torch.randn(8, 1, 16, 16, device="cuda")
    eager_out, eager_grads = _train_step(model, x)
    compiled_out, compiled_grads = _train_step(compiled, x)  # type: ignore[arg-type]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-4)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
