"""A layer's step as :mod:`bkn_export.triton_step`'s one node against the op with the prior assembled separately.

On the Triton route (CUDA; here the CPU under Triton's interpreter, :data:`bkn_export.kernels.TRITON_ON_CPU`, in a
child process), a BKN layer's eager train step runs the op's kernels with the prior's assembly inside them and
returns γ and β as outputs of its node, so that the next layers' gradients of γ and β are added in the op's
backward kernel instead of by autograd. Nothing of the math changes: the step of a converted network
(``tests/support/triton_steps.py``: every fused prediction kind, a residual sum, a Linear) is compared with the
same step where every layer takes ``torch.ops.bkn.batch_kalman_norm`` with the separate assembly launch
(``forms="separate"``): outputs, every parameter gradient and every running statistic, bit for bit (the
interpreter evaluates the same float64 assembly formulas, rounded once, and the same float32 additions; on a GPU
the compiled kernels may contract differently into FMA, which no test here can see).
``tests/test_kernels_assembled.py`` compares the launchers themselves.
"""

from __future__ import annotations

import pytest
import torch
from support.triton_interpreter import InterpreterProcess
from support.triton_steps import tensors_of


@pytest.mark.parametrize("seed", [0, 1])
def test_one_node_step_equals_the_separate_step(route_interpreter: InterpreterProcess, seed: int) -> None:
    fused = route_interpreter.call("support.triton_steps:train_step", "float32", seed)
    separate = route_interpreter.call("support.triton_steps:train_step", "float32", seed, "separate")
    assert "prior_assembly" not in fused["launches"], "the fused step ran the separate assembly launch"
    assert separate["launches"].get("prior_assembly", 0) == 4, "the 4 wired layers' priors not assembled apart"
    fused_tensors, separate_tensors = tensors_of(fused), tensors_of(separate)
    assert fused_tensors.keys() == separate_tensors.keys()
    assert len([k for k in fused_tensors if k.startswith("grad.")]) >= 20
    differing = [k for k in fused_tensors if not torch.equal(fused_tensors[k], separate_tensors[k])]
    assert differing == [], differing


def test_with_the_fallback_rule_the_prior_is_assembled_apart_and_the_step_still_equal(
    route_interpreter: InterpreterProcess,
) -> None:
    """fallback_ratio > 0: the rule reads every channel's assembled Σ_pred first, so the layer assembles its prior
    itself (the separate launch) and the node still adds γ's and β's other gradients in the op's kernels."""
    fused = route_interpreter.call(
        "support.triton_steps:train_step", "float32", 4, "kernels", "cpu", fallback_ratio=50.0
    )
    separate = route_interpreter.call(
        "support.triton_steps:train_step", "float32", 4, "separate", "cpu", fallback_ratio=50.0
    )
    assert fused["launches"].get("prior_assembly", 0) == 4
    fused_tensors, separate_tensors = tensors_of(fused), tensors_of(separate)
    differing = [k for k in fused_tensors if not torch.equal(fused_tensors[k], separate_tensors[k])]
    assert differing == [], differing


def test_second_derivatives_through_the_node_equal_the_separate_steps(route_interpreter: InterpreterProcess) -> None:
    """create_graph=True: the node differentiates the op and the assembly's PyTorch operators again; the
    gradients of ‖∂L/∂θ‖² agree with those of the separate step (both through the op's reference double
    backward: float32, one rounding order apart)."""
    fused = route_interpreter.call("support.triton_steps:gradient_penalty_step", "float32", 5)
    separate = route_interpreter.call("support.triton_steps:gradient_penalty_step", "float32", 5, "separate")
    assert fused.keys() == separate.keys() and len(fused) >= 20
    assert sum(int(bool(separate[name].abs().sum() > 0)) for name in separate) >= 20
    for name in fused:
        scale = max(separate[name].abs().max().item(), 1e-3)
        torch.testing.assert_close(fused[name], separate[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_an_observer_sees_the_prior_the_op_received(route_interpreter: InterpreterProcess) -> None:
    """chain_statistics records the assembled prior: under an observer the layer assembles it itself (the op's
    kernels would not hand it out), and every recorded value equals the separate step's."""
    fused = route_interpreter.call("support.triton_steps:observed_statistics", "float32", 6)
    separate = route_interpreter.call("support.triton_steps:observed_statistics", "float32", 6, "separate")
    assert fused.keys() == separate.keys()
    assert len([k for k in fused if k.endswith(".prior_variance")]) == 4
    differing = [k for k in fused if not torch.equal(fused[k], separate[k])]
    assert differing == [], differing


@pytest.mark.gpu
def test_on_a_gpu_the_one_node_step_agrees_with_the_separate_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (compiled kernels): the same comparison in float32. Not bit for bit there: the compiled assembly
    may contract into FMA differently from the separate launch (float64, then rounded to float32 once), so each
    tensor is held to 1e-5 of its scale. TF32 off: the convs must compute in float32."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible to torch on this machine")
    pytest.importorskip("triton", reason="the kernels need the triton package")
    from support import triton_steps

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fused = tensors_of(triton_steps.train_step("float32", 7, device="cuda"))
    separate = tensors_of(triton_steps.train_step("float32", 7, "separate", device="cuda"))
    assert fused.keys() == separate.keys() and len([k for k in fused if k.startswith("grad.")]) >= 20
    for name in fused:
        scale = max(separate[name].abs().max().item(), 1e-3)
        torch.testing.assert_close(fused[name], separate[name], rtol=0, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("assembled", [True, False], ids=["assembly in the kernels", "prior weight given"])
def test_the_node_reads_no_tensor_value_on_the_host(monkeypatch: pytest.MonkeyPatch, assembled: bool) -> None:
    """Forward and backward of the one-node step decide on shapes and Python floats only, so that a train step can
    be captured in a CUDA graph: run in this process with every Triton kernel recorded instead of launched, no
    tensor value is read back (``.item()``, ``bool(t)``: on a GPU each would be a host synchronisation)."""
    pytest.importorskip("triton", reason="the launchers import triton (pip install triton)")
    from support.assembled_cases import draw_inputs
    from support.triton_compile import Launch, ScalarReads, record_kernels

    from bkn_export import triton_step
    from bkn_export.kernels import backward, forward

    calls: list[Launch] = []
    record_kernels(monkeypatch, (forward, backward), calls)
    inputs = draw_inputs(seed=3)
    leaves = {k: inputs[k].requires_grad_() for k in ("x", "prior_mean", "variance", "raw", "logit", "weight", "bias")}
    prior_weight = None if assembled else torch.full_like(inputs["variance"], 0.25)
    assembly = (leaves["raw"], leaves["logit"], inputs["known"]) if assembled else None
    with ScalarReads() as mode:
        y, mean, variance, weight, bias = triton_step.kalman_norm_step(
            leaves["x"], leaves["prior_mean"], leaves["variance"], prior_weight, assembly, leaves["weight"],
            leaves["bias"], 1e-5, 0.0,
        )  # fmt: skip
        assert all(t is not None for t in (y, mean, variance, weight, bias))
        torch.autograd.backward(
            [y, mean, variance, weight, bias],
            [inputs["grad_output"], inputs["grad_posterior_mean"], inputs["grad_posterior_variance"],
             inputs["extra_grad_weight"], inputs["extra_grad_bias"]],
        )  # fmt: skip
    assert mode.reads == []
    launched = [kernel.__name__ for kernel, _, _ in calls]
    assert any("forward" in name for name in launched) and any("backward" in name for name in launched), launched
    assert leaves["x"].grad is not None and (leaves["raw"].grad is not None) == assembled


#: The only host reads a step on the CUDA route makes: tables of constants that :mod:`bkn_export.native` keeps as
#: CPU float64 tensors (a conv's (B, K, groups), an activation's (pieces, kind)), each read after its caller
#: checked ``device.type == "cpu"``; they never live on the GPU, so reading them synchronises nothing.
_CPU_TABLE_READS = {
    "tolist kernels/affine_moments.py:_geometry",
    "tolist kernels/path_moments.py:path_moments_take",
    "tolist kernels/path_moments.py:_activation_taken",
}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "momentum None"])
def test_a_train_step_on_the_cuda_route_reads_only_cpu_tables_on_the_host(
    route_interpreter: InterpreterProcess, momentum: float | None
) -> None:
    """Issue 18.2's condition for capturing a step in a CUDA graph, for the whole eager step of a converted network
    (every fused prediction kind, the one-node step, running statistics; with ``momentum=None``,
    num_batches_tracked is not read on the host): every read of a tensor value made by ``bkn_export`` code is
    one of the CPU-table reads above."""
    reads = route_interpreter.call("support.triton_steps:host_reads", "float32", 8, momentum)
    assert reads, "no read recorded: the recorder did not see bkn_export's table reads"
    assert set(reads) <= _CPU_TABLE_READS, sorted(set(reads) - _CPU_TABLE_READS)
