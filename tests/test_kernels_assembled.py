"""The op's Triton launchers with the prior's last step and γ's / β's other gradients fused in equal, bit for
bit, the separate launches they replace.

Fused (``bkn_export.kernels``): ``batch_kalman_norm_forward(..., assembly=PriorAssembly(r, l, k, L))`` computes
Σ_pred = v + softplus(r) and p = L sigmoid(l) [· k] in its own kernels, and
``batch_kalman_norm_backward_assembled(..., extra_grad_weight, extra_grad_bias)`` returns ∂L/∂(x, μ_pred, v, r,
l, γ, β) with the assembly's backward and the extras' adds done in its kernels. Separate: the ``prior_assembly``
twin (``kernels.prior_moments``), the op's forward and backward with ``prior_weight=p``, the
``prior_assembly_backward`` twin on the op's (∂Σ_pred, ∂p), and ∂γ + extra, ∂β + extra as float32 torch adds
(``tests/support/assembled_cases.py`` runs both in the Triton interpreter's child process, see
``tests/support/triton_interpreter.py``).

Why bit for bit (``torch.equal``), not a tolerance: the fused kernels evaluate the twins' own float64 formulas
(``prior_moments.assembled_prior`` / ``assembly_gradients``, the same jit functions) on the same float32
inputs and round to float32 once, where the twins store; every float32 operation after that is the op's, in
the op's order; and a float32 add of the extra is one rounding either way. So any difference is a wrong input,
formula, mask or store, never rounding. Triton's interpreter evaluates each operation in NumPy and does not
contract a multiply and an add into an FMA; on a GPU the fused kernels (compiled with fp fusion) may contract
differently from the separate launches, a difference of rounding this test cannot see. The sm_90 compile test
at the end checks only that the new variants compile.

Inputs: float32, drawn in float64 and rounded, seeds fixed; the first channels carry hostile values (raw > 20:
softplus' threshold branch; raw = -100; logit ±30; a prediction variance 10³-10⁴ times the batch variance),
the known mask has zeros. Both layouts (one kernel and three), with and without the mask, γ / β, and each
extra; a channels-last case spans several channel blocks. Also: the extras on the fallback rule's kernel, the
launchers' refusals, no value read on the host and the launch counts (meta tensors, kernels recorded), and
the compilation of the new kernel variants for an H100.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from support import assembled_cases
from support.assembled_cases import EPS, HOSTILE_PERIOD, UNKNOWN_CHANNELS
from support.triton_compile import Launch, ScalarReads, compile_for_hopper, record_kernels
from support.triton_interpreter import InterpreterProcess
from torch import Tensor

from bkn_export import functional as Fk
from bkn_export.errors import BKNInputError

FORWARD_NAMES = ("y", "posterior_mean", "posterior_variance")
BACKWARD_NAMES = ("grad_x", "grad_prior_mean", "grad_variance", "grad_raw", "grad_logit", "grad_weight", "grad_bias")
_LAYOUTS = {"one-kernel": True, "three-kernel": False}
#: Which extras are given: (∂γ's, ∂β's).
_EXTRAS = {
    "no-extras": (False, False),
    "extras": (True, True),
    "weight-extra": (True, False),
    "bias-extra": (False, True),
}


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterProcess]:
    pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")
    with InterpreterProcess() as process:
        yield process


def assert_bitwise(actual: Tensor, expected: Tensor, what: str) -> None:
    """``torch.equal`` (and the same dtype, shape and strides), with the first differing element named on failure."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.stride() == expected.stride(), f"{what}: strides {actual.stride()} != {expected.stride()}"
    if torch.equal(actual, expected):
        return
    differs = (actual != expected).flatten()
    first = int(differs.nonzero()[0])
    raise AssertionError(
        f"{what}: {int(differs.sum())} of {differs.numel()} elements differ; first at flat index {first}: got "
        f"{float(actual.flatten()[first])!r}, expected {float(expected.flatten()[first])!r}"
    )


def check_fused_equals_separate(
    interpreter: InterpreterProcess, inputs: dict[str, Any], single_program: bool
) -> dict[str, dict[str, Tensor]]:
    result = interpreter.call("support.assembled_cases:fused_and_separate", inputs, single_program)
    fused, separate = result["fused"], result["separate"]
    assert set(fused) == {*FORWARD_NAMES, *BACKWARD_NAMES}
    for name in (*FORWARD_NAMES, *BACKWARD_NAMES):
        assert_bitwise(fused[name], separate[name], name)
        assert bool(fused[name].isfinite().all()), f"{name}: not finite"
    assert fused["y"].stride() == inputs["x"].stride() and fused["grad_x"].stride() == inputs["x"].stride()

    # Not vacuous: no γ gives zeros (its extra ignored); a given extra changed every channel's gradient.
    if inputs["weight"] is None:
        assert bool((fused["grad_weight"] == 0).all())
    elif inputs["extra_grad_weight"] is not None:
        assert bool((fused["grad_weight"] != separate["op_grad_weight"]).all())
    if inputs["extra_grad_bias"] is not None:
        assert bool((fused["grad_bias"] != separate["op_grad_bias"]).all())
    return result


def check_hostile_branches(result: dict[str, dict[str, Tensor]], inputs: dict[str, Any]) -> None:
    """The hostile channels took the branches they are there for (values of the fused results)."""
    fused, prior_weight = result["fused"], result["separate"]["prior_weight"]
    limit = torch.tensor(Fk.PRIOR_WEIGHT_LIMIT, dtype=torch.float32)
    assert fused["grad_raw"][0] == fused["grad_variance"][0]  # r = 25 > 20: ∂r = ∂v exactly
    assert fused["grad_raw"][1].abs() < 1e-40  # r = -100: ∂r = ∂v sigmoid(-100)
    assert prior_weight[2] == limit and 0 < fused["grad_logit"][2].abs() < 1e-10  # l = 30: s (1 - s) ~ 1e-13
    assert prior_weight[3] < 1e-12  # l = -30 (0 with known: its mask is 0)
    if inputs["known"] is not None:
        unknown = list(UNKNOWN_CHANNELS)
        assert bool((prior_weight[unknown] == 0).all()) and bool((fused["grad_logit"][unknown] == 0).all())
    else:
        assert prior_weight[5] == limit
    batch_variance = inputs["x"][:, 4].double().var(unbiased=False)
    assert result["separate"]["prior_variance"][4] >= 1e3 * batch_variance  # v = 10⁴ ≫ S ~ 4


# --------------------------------------------------------------------------- fused = separate, bit for bit


@pytest.mark.parametrize("extras", _EXTRAS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("known", [True, False], ids=["known", "no-known"])
@pytest.mark.parametrize("layout", _LAYOUTS)
def test_fused_step_equals_the_separate_launches(
    interpreter: InterpreterProcess, layout: str, known: bool, affine: bool, extras: str
) -> None:
    """(3, 12, 5, 7) channels-first: one channel block (partly masked), three samples' partials on three kernels."""
    inputs = assembled_cases.draw_inputs(seed=1, known=known, affine=affine, extras=_EXTRAS[extras])
    result = check_fused_equals_separate(interpreter, inputs, _LAYOUTS[layout])
    check_hostile_branches(result, inputs)


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_fused_step_equals_the_separate_launches_across_channel_blocks(
    interpreter: InterpreterProcess, layout: str
) -> None:
    """(2, 70, 3, 5) channels-last: 70 channels are 2 blocks of 64 on one kernel, 3 of 32 (the last partial) on
    three, with the hostile channels repeated in every block of 32."""
    inputs = assembled_cases.draw_inputs((2, 70, 3, 5), seed=2, channels_last=True)
    result = check_fused_equals_separate(interpreter, inputs, _LAYOUTS[layout])
    for start in range(0, 70, HOSTILE_PERIOD):
        assert bool((inputs["known"][[start + c for c in UNKNOWN_CHANNELS if start + c < 70]] == 0).all())
        assert result["fused"]["grad_raw"][start] == result["fused"]["grad_variance"][start]  # r > 20


# --------------------------------------------------------------------------- extras on the fallback rule's kernel


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("fires", [True, False], ids=["fires", "holds"])
def test_extras_on_the_fallback_path(interpreter: InterpreterProcess, fires: bool, affine: bool) -> None:
    """fallback_ratio > 0 (three kernels and ``_backward_fallback_kernel``, no assembly): ∂γ and ∂β are the op's
    plus the extras (float32 adds) bit for bit, the other gradients those without extras."""
    inputs = assembled_cases.draw_inputs(seed=3, affine=affine)
    prior_weight = torch.rand(inputs["variance"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    prior_weight = (0.9 * prior_weight).to(torch.float32)
    ratio = 1.0 if fires else 1e6  # mean(Σ_pred / S) is ~300 here (v = 10⁴, 3·10³ on two channels)
    result = interpreter.call("support.assembled_cases:fallback_extras", inputs, prior_weight, ratio)
    with_extras, without = result["with"], result["without"]
    names = ("grad_x", "grad_prior_mean", "grad_prior_variance", "grad_prior_weight")
    for name, actual, expected in zip(names, with_extras[:4], without[:4]):
        assert_bitwise(actual, expected, name)
    assert bool((with_extras[3] == 0).all()) == fires  # the rule zeroes ∂p where it fires, only there
    if affine:
        assert_bitwise(with_extras[4], without[4] + inputs["extra_grad_weight"], "grad_weight")
        assert bool((with_extras[4] != without[4]).all())
    else:
        assert bool((with_extras[4] == 0).all()) and bool((without[4] == 0).all())
    assert_bitwise(with_extras[5], without[5] + inputs["extra_grad_bias"], "grad_bias")
    assert bool((with_extras[5] != without[5]).all())


# --------------------------------------------------------------------------- refusals


_ForwardArguments = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, float, float]


def _forward_arguments(inputs: dict[str, Any], prior_weight: Tensor | None, fallback_ratio: float) -> _ForwardArguments:
    return (
        inputs["x"], inputs["prior_mean"], inputs["variance"], prior_weight, inputs["weight"], inputs["bias"], EPS,
        fallback_ratio,
    )  # fmt: skip


def _assembly(inputs: dict[str, Any]) -> Any:
    """A PriorAssembly as the child builds it (the class imports Triton: built there, not here)."""
    return (inputs["raw"], inputs["logit"], inputs["known"], Fk.PRIOR_WEIGHT_LIMIT)


@pytest.mark.parametrize("layout", [*_LAYOUTS, "by-size"])
def test_assembly_refuses_the_fallback_rule(interpreter: InterpreterProcess, layout: str) -> None:
    inputs = assembled_cases.draw_inputs()
    single_program = None if layout == "by-size" else _LAYOUTS[layout]
    with pytest.raises(BKNInputError, match=r"prior's assembly cannot run .* under the fallback rule"):
        interpreter.call(
            "support.assembled_cases:forward_with_assembly",
            _forward_arguments(inputs, None, 0.5),
            _assembly(inputs),
            single_program,
        )


@pytest.mark.parametrize("given", ["both", "neither"])
def test_forward_takes_exactly_one_of_prior_weight_and_assembly(interpreter: InterpreterProcess, given: str) -> None:
    inputs = assembled_cases.draw_inputs()
    prior_weight = torch.full((assembled_cases.CHANNELS,), 0.5) if given == "both" else None
    with pytest.raises(BKNInputError, match=f"pass either prior_weight .* or assembly .*, not {given}"):
        interpreter.call(
            "support.assembled_cases:forward_with_assembly",
            _forward_arguments(inputs, prior_weight, 0.0),
            _assembly(inputs) if given == "both" else None,
            None,
        )


def test_backward_without_prior_weight_is_refused(interpreter: InterpreterProcess) -> None:
    """The non-assembled backward with ``prior_weight=None``: neither p nor an assembly."""
    inputs = assembled_cases.draw_inputs()
    arguments = (
        inputs["grad_output"], inputs["grad_posterior_mean"], inputs["grad_posterior_variance"], inputs["x"],
        inputs["prior_mean"], inputs["variance"], None, inputs["weight"], EPS, 0.0,
    )  # fmt: skip
    with pytest.raises(BKNInputError, match="not neither"):
        interpreter.call("backward", *arguments)


# --------------------------------------------------------------------------- host reads, launches, compilation

_META = torch.device("meta")
#: The kernels that take the new flags, and the flags each takes.
_FLAGGED = {
    "_single_program_forward_kernel": ("ASSEMBLE", "HAS_KNOWN"),
    "_forward_statistics_kernel": ("ASSEMBLE", "HAS_KNOWN"),
    "_single_program_backward_kernel": ("ASSEMBLE", "HAS_KNOWN", "HAS_EXTRA_WEIGHT", "HAS_EXTRA_BIAS"),
    "_backward_statistics_kernel": ("ASSEMBLE", "HAS_KNOWN", "HAS_EXTRA_WEIGHT", "HAS_EXTRA_BIAS"),
    "_backward_fallback_kernel": ("HAS_EXTRA_WEIGHT", "HAS_EXTRA_BIAS"),
}


def _meta_inputs(shape: tuple[int, ...] = (4, 6, 5, 7)) -> dict[str, Any]:
    """:func:`assembled_cases.draw_inputs`' names, every tensor on the meta device (no values: a read fails)."""
    channels = shape[1]
    inputs: dict[str, Any] = {
        name: torch.empty(channels, device=_META)
        for name in (
            "prior_mean", "variance", "raw", "logit", "known", "weight", "bias", "grad_posterior_mean",
            "grad_posterior_variance", "extra_grad_weight", "extra_grad_bias",
        )
    }  # fmt: skip
    inputs["x"], inputs["grad_output"] = torch.empty(shape, device=_META), torch.empty(shape, device=_META)
    return inputs


def _recorded_launches(
    monkeypatch: pytest.MonkeyPatch, single_program: bool, assembled: bool, fallback_ratio: float = 0.0
) -> tuple[list[Launch], list[Launch]]:
    """Forward and backward launches (kernel, args, kwargs) on meta tensors with every kernel recorded instead of
    launched: assembled (with known and both extras) or with p (and both extras on the backward)."""
    from bkn_export.kernels import backward, forward
    from bkn_export.kernels.common import PriorAssembly

    calls: list[Launch] = []
    record_kernels(monkeypatch, (forward, backward), calls)
    inputs = _meta_inputs()
    grads = (inputs["grad_output"], inputs["grad_posterior_mean"], inputs["grad_posterior_variance"], inputs["x"])
    extras = {"extra_grad_weight": inputs["extra_grad_weight"], "extra_grad_bias": inputs["extra_grad_bias"]}
    if assembled:
        assembly = PriorAssembly(inputs["raw"], inputs["logit"], inputs["known"], Fk.PRIOR_WEIGHT_LIMIT)
        forward.batch_kalman_norm_forward(
            *_forward_arguments(inputs, None, 0.0), single_program=single_program, assembly=assembly
        )
        forward_calls = calls[:]
        backward.batch_kalman_norm_backward_assembled(
            *grads, inputs["prior_mean"], inputs["variance"], assembly, inputs["weight"], EPS,
            single_program=single_program, **extras,
        )  # fmt: skip
    else:
        prior_weight = torch.empty_like(inputs["variance"])
        forward.batch_kalman_norm_forward(
            *_forward_arguments(inputs, prior_weight, fallback_ratio), single_program=single_program
        )
        forward_calls = calls[:]
        backward.batch_kalman_norm_backward(
            *grads, inputs["prior_mean"], inputs["variance"], prior_weight, inputs["weight"], EPS, fallback_ratio,
            single_program=single_program, **extras,
        )  # fmt: skip
    return forward_calls, calls[len(forward_calls) :]


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_assembled_launchers_read_no_tensor_value_on_the_host(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """The assembled forward and backward (known mask, both extras) decide everything from shapes and Python
    floats: on meta tensors a read would raise, and none is recorded. They launch as many kernels as the
    launchers with p (1 and 1 on one kernel, 3 and 3 on three), with the new flags set on the kernels that
    take them."""
    pytest.importorskip("triton", reason="the launchers import triton (pip install triton)")
    single_program = _LAYOUTS[layout]
    with ScalarReads() as mode:
        forward_calls, backward_calls = _recorded_launches(monkeypatch, single_program, assembled=True)
    assert mode.reads == []
    plain_forward, plain_backward = _recorded_launches(monkeypatch, single_program, assembled=False)
    expected = 1 if single_program else 3
    assert len(forward_calls) == len(plain_forward) == expected
    assert len(backward_calls) == len(plain_backward) == expected
    assert [k.__name__ for k, _, _ in forward_calls] == [k.__name__ for k, _, _ in plain_forward]
    assert [k.__name__ for k, _, _ in backward_calls] == [k.__name__ for k, _, _ in plain_backward]
    flagged = [(k.__name__, kwargs) for k, _, kwargs in forward_calls + backward_calls if k.__name__ in _FLAGGED]
    assert len(flagged) == 2  # one forward and one backward kernel take the assembly
    for name, kwargs in flagged:
        assert all(kwargs[flag] is True for flag in _FLAGGED[name]), (name, kwargs)


def test_new_kernel_variants_compile_for_an_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kernel that takes a new flag compiles to an sm_90 cubin with the flags set (Triton's compiler and
    ptxas, no GPU): the assembled pair on one kernel and on three (known mask, both extras), and the fallback
    kernel with both extras. The interpreter does not check Triton's typing rules (float64 values in float32
    kernels, constexpr branches); the other kernels are unchanged and compiled by tests/test_kernels.py."""
    pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; kernels are interpreted, not compiled")
    launches = [
        *(call for single_program in (True, False) for part in _recorded_launches(monkeypatch, single_program, True)
          for call in part),
        *_recorded_launches(monkeypatch, False, assembled=False, fallback_ratio=2.0)[1],
    ]  # fmt: skip
    compiled: list[str] = []
    for kernel, args, kwargs in launches:
        name = kernel.__name__
        flags = _FLAGGED.get(name, ())
        if not flags or not all(kwargs[flag] for flag in flags):
            continue
        binary = compile_for_hopper(kernel, args, dict(kwargs))
        assert binary.asm["cubin"], f"{name}: no cubin"
        compiled.append(name)
    assert sorted(compiled) == sorted(_FLAGGED)
