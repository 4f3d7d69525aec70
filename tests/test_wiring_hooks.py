"""Wiring warns about forward hooks on the modules a prediction goes through. The recorder follows what a hook computed
in the wiring forward as it follows the forward's own code (a ×3 hook is a ×3 step of the path, its number a
constant), so a hook that computes otherwise later is predicted as it ran then: the warning says so. (It said the
hook was "not in" the prior, which a tester found false, third QA of 2026-12-07: the prior's variance tracked the ×3.)
Torch's weight reparametrization pre-hooks are not warned about."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

from bkn_export import convert_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )


def _hook_warnings(prepare: Callable[[nn.Sequential], object]) -> list[str]:
    model = _net()
    prepare(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    return [str(w.message) for w in caught if "forward hooks on modules the Kalman chain" in str(w.message)]


@pytest.mark.parametrize(
    ("prepare", "named"),
    [
        (lambda m: m[2].register_forward_hook(lambda mod, args, out: out * 2), "'2' (0 pre-hook(s), 1 hook(s))"),
        (lambda m: m[1].register_forward_hook(lambda mod, args, out: out + 1), "'1' (0 pre-hook(s), 1 hook(s))"),
        (lambda m: m[3].register_forward_pre_hook(lambda mod, args: (args[0] * 2,)), "'3' (1 pre-hook(s), 0 hook(s))"),
    ],
    ids=["activation output", "source layer output", "conv input"],
)
def test_a_hook_on_a_predicted_module_is_named(prepare: Callable[[nn.Sequential], object], named: str) -> None:
    (message,) = _hook_warnings(prepare)
    assert named in message and "follows what a hook computed in the wiring forward" in message


@pytest.mark.parametrize("hook", ["output", "input"])
def test_a_hooks_arithmetic_is_in_the_prior_as_recorded(hook: str) -> None:
    """A ×3 forward hook on the conv (or pre-hook on its input) is a ×3 step of the path: the prior's variance is
    9 times that of the network without the hook, as the layer's own batch variance is."""
    from bkn_export import chain_statistics, format_chain

    def prior_and_batch(model: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_batchnorm(model, torch.randn(2, 3, 8, 8))
        torch.manual_seed(1)
        layer = chain_statistics(model, torch.randn(64, 3, 8, 8))[1]
        assert layer.prior_variance is not None
        return layer.prior_variance, layer.batch_variance

    plain_prior, plain_batch = prior_and_batch(_net())  # Σ_pred + R: the process noise R is added after the path
    hooked = _net()
    if hook == "output":
        hooked[3].register_forward_hook(lambda mod, args, out: out * 3)
    else:
        hooked[3].register_forward_pre_hook(lambda mod, args: (args[0] * 3,))
    prior, batch = prior_and_batch(hooked)
    noise = hooked[4].process_noise().detach()
    torch.testing.assert_close(prior - noise, 9 * (plain_prior - noise), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(batch, 9 * plain_batch, rtol=1e-4, atol=0.0)
    assert "×3 + 0" in format_chain(hooked)


@pytest.mark.parametrize(
    "prepare",
    [
        lambda m: torch.nn.utils.prune.l1_unstructured(m[3], "weight", 0.3),
        lambda m: torch.nn.utils.spectral_norm(m[3]),
        lambda m: m[4].register_forward_hook(lambda mod, args, out: None),  # after the last layer: not on a path
    ],
    ids=["prune", "spectral_norm", "hook past the chain"],
)
def test_weight_reparametrizations_and_other_modules_are_not_warned(prepare: Callable[[nn.Sequential], object]) -> None:
    assert _hook_warnings(prepare) == []


def _converted(prepare: Callable[[nn.Sequential], object] = lambda m: None) -> nn.Sequential:
    model = _net()
    prepare(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    return model


def _train_step_warnings(model: nn.Module, channels: int = 3) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()(torch.randn(4, channels, 8, 8)).sum().backward()
    return [str(w.message) for w in caught if "other forward hooks than when the chain was wired" in str(w.message)]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m[3].register_forward_hook(lambda mod, args, out: out * 3), "'3': 1 forward hook(s) added"),
        (
            lambda m: m[4].register_forward_pre_hook(lambda mod, args: (args[0] * 3,)),
            "'4': 1 forward pre-hook(s) added",
        ),
        (lambda m: m[1].register_forward_hook(lambda mod, args, out: out * 3), "'1': 1 forward hook(s) added"),
        (lambda m: setattr(m[2], "forward", lambda x: torch.relu(x) * 3), "'2': its forward set on the instance"),
    ],
    ids=["conv output", "layer input", "source output", "activation forward"],
)
def test_a_hook_added_after_wiring_is_named_at_the_first_train_step(
    change: Callable[[nn.Sequential], object], named: str
) -> None:
    """A hook added after wiring is not in the prior: a cold QA (fifth session of 2026-12-07) found a ×3 hook on the
    conv, the layer's input or the source's output, or a forward set on the ReLU, leave the prior's variance 1/9 of
    the network's with no word at train time. The first train step now names the module and the change, once per
    model."""
    model = _converted()
    change(model)
    (message,) = _train_step_warnings(model)
    assert named in message and "wire the chain again" in message
    assert _train_step_warnings(model) == []


def test_a_hook_removed_after_wiring_is_named() -> None:
    """A ×3 hook present at wiring is a step of the path (format_chain shows it); removing it left the prior's
    variance 8.9 times the network's, silently."""
    handles = []
    model = _converted(lambda m: handles.append(m[3].register_forward_hook(lambda mod, args, out: out * 3)))
    handles[0].remove()
    (message,) = _train_step_warnings(model)
    assert "'3': 1 forward hook(s) removed" in message


def _library_hook(module: nn.Module, args: object, out: object) -> None:
    return None


_library_hook.__module__ = "runtime.backends.torch_eager"  # as parity's localisation hooks are


@pytest.mark.parametrize(
    "change",
    [
        lambda m: torch.nn.utils.prune.l1_unstructured(m[3], "weight", 0.3),
        lambda m: torch.nn.utils.weight_norm(m[3]),
        lambda m: m[4].register_forward_hook(lambda mod, args, out: None),  # the layer's own output: not its input
        lambda m: m[3].register_forward_hook(_library_hook),
    ],
    ids=["prune", "weight_norm", "the layer's output", "the library's own hook"],
)
def test_hook_changes_that_leave_the_prediction_as_wired_are_not_named(
    change: Callable[[nn.Sequential], object],
) -> None:
    model = _converted()
    change(model)
    assert _train_step_warnings(model) == []


def test_a_forward_set_on_an_instance_is_recorded_instead_of_its_class_forward() -> None:
    """``relu.forward = lambda x: torch.relu(x) * 3`` before conversion: the recorder took the class's ReLU (a cold QA
    found the prior's variance 0.112 of the network's, no note); it now records the instance's forward, a ×3 step."""
    from bkn_export import chain_statistics, format_chain

    def prior_variance(model: nn.Sequential) -> torch.Tensor:
        torch.manual_seed(1)
        variance = chain_statistics(model, torch.randn(64, 3, 8, 8))[1].prior_variance
        assert variance is not None
        return variance - model[4].process_noise().detach()

    patched = _converted(lambda m: setattr(m[2], "forward", lambda x: torch.relu(x) * 3))
    assert "×3 + 0" in format_chain(patched)
    torch.testing.assert_close(prior_variance(patched), 9 * prior_variance(_converted()), rtol=1e-5, atol=0.0)


def test_spectral_norm_runs_one_power_iteration_per_forward_as_with_batchnorm() -> None:
    """``parametrizations.spectral_norm`` on the conv a prior goes through: in train mode every read of its weight runs
    a power iteration, and the prediction read it 4–7 more times per forward (a cold QA, fifth session of 2026-12-07:
    its vector u 0.10 from the BatchNorm model's after one forward, the prior of another σ than the conv's). The
    prediction reads it with the parametrization in eval mode: σ from the vectors the conv's own read just updated."""
    from torch.nn.utils.parametrizations import spectral_norm

    def with_spectral_norm(model: nn.Sequential) -> None:
        torch.manual_seed(5)
        spectral_norm(model[3])

    batchnorm = _net()
    with_spectral_norm(batchnorm)
    converted = _converted(with_spectral_norm)
    torch.manual_seed(2)
    for x in torch.randn(3, 4, 3, 8, 8):
        batchnorm.train()(x)
        converted.train()(x)
    vectors = [m[3].parametrizations.weight[0] for m in (batchnorm, converted)]
    torch.testing.assert_close(vectors[1]._u, vectors[0]._u, rtol=0.0, atol=0.0)
    torch.testing.assert_close(vectors[1]._v, vectors[0]._v, rtol=0.0, atol=0.0)
    assert converted[3].parametrizations.weight[0].training  # left as it was


def test_a_model_pickled_before_the_hooks_were_kept_trains() -> None:
    """A whole-model pickle saved before the chain kept hooks (its memberships lack the field, its root passes no
    hooks): the first train step crashed (AttributeError '_hooked', a review of the fifth session of 2026-12-07).
    It trains, comparing no hooks, and its copies do too."""
    import copy
    import io

    model = _converted()
    layer = model[4]
    object.__delattr__(layer.chain, "_hooked")  # as unpickled from before: no __post_init__ ran
    layer.chain.root.hooks = {}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for trained in (loaded, copy.deepcopy(loaded)):
        assert _train_step_warnings(trained) == []


def test_a_normalization_whose_forward_is_set_on_its_instance_is_no_source() -> None:
    """``bn.forward = lambda t: Bkn.forward(bn, t) * 2`` before wiring: the recorder took the layer's output for the
    normalization's (the ×2 missing from the path: the next prior 2× off in mean, 4× in variance, no note; a review
    of the fifth session of 2026-12-07). The layer it feeds starts its chain, saying why."""
    from bkn_export import format_chain, wire_chain

    model = _converted()
    layer = model[1]
    layer.forward = lambda t: type(layer).forward(layer, t) * 2
    with pytest.warns(UserWarning, match=r"1 normalization layer\(s\) have a forward set on their instance \('1'"):
        wire_chain(model, torch.randn(2, 3, 8, 8))
    assert model[4].chain.transition is None
    assert "its source '1' has a forward set on its instance" in format_chain(model)


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _blocks() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(4), _Block(4), _Block(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(model, torch.randn(2, 4, 8, 8))
    return model


def _block_step_warnings(model: nn.Module) -> list[str]:
    return _train_step_warnings(model, channels=4)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m[0].register_forward_hook(lambda mod, args, out: out * 3), "'0': 1 forward hook(s) added"),
        (lambda m: m[1].register_forward_pre_hook(lambda mod, args: (args[0] * 3,)), "'1': 1 forward pre-hook(s)"),
    ],
    ids=["output of the block a path leaves", "input of the block a path enters"],
)
def test_a_hook_added_after_wiring_on_a_block_a_path_crosses_is_named(
    change: Callable[[nn.Sequential], object], named: str
) -> None:
    """The path from block 0's normalization to block 1's leaves block 0 by its output and enters block 1 by its
    input: a ×3 hook there after wiring changes what the path carries (a prior variance 1/9 of the network's), and
    only the modules on the path were compared (the left items of 2026-12-07's fifth session)."""
    model = _blocks()
    change(model)
    (message,) = _block_step_warnings(model)
    assert named in message


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.register_forward_hook(lambda mod, args, out: out * 3),  # the root: the model's output
        lambda m: m[0].register_forward_pre_hook(lambda mod, args: (args[0] * 3,)),  # before the first normalization
        lambda m: m[2].register_forward_hook(lambda mod, args, out: out * 3),  # after the last
    ],
    ids=["the root", "the first block's input", "the last block's output"],
)
def test_a_hook_on_a_block_no_path_crosses_that_way_is_not_named(change: Callable[[nn.Sequential], object]) -> None:
    model = _blocks()
    change(model)
    assert _block_step_warnings(model) == []


@pytest.mark.parametrize(
    ("module", "change", "named"),
    [
        (nn.LeakyReLU(0.1), lambda a: setattr(a, "negative_slope", 0.5), "negative_slope 0.1 → 0.5"),
        (nn.Hardtanh(-1.0, 1.0), lambda a: setattr(a, "max_val", 0.3), "max_val 1.0 → 0.3"),
        (nn.AvgPool2d(2), lambda a: setattr(a, "kernel_size", 3), "kernel_size 2 → 3"),
    ],
    ids=["leaky slope", "hardtanh bound", "pool kernel"],
)
def test_a_setting_changed_after_wiring_on_a_path_module_is_refused(
    module: nn.Module, change: Callable[[nn.Module], object], named: str
) -> None:
    """A cold QA (sixth session of 2026-12-07): ``negative_slope`` 0.1 → 0.5 after conversion left the prior's
    variance 37 % low (Hardtanh's bounds: 8.4× high; a pooling's kernel: +135 %), the chain still describing the old
    value, no word. The recorded steps hold those settings as constants (a conv's stride and padding are read at
    every call); the train step now refuses, as it does for a module replaced after wiring, and wiring again
    follows the new setting. ``inplace`` changes nothing and passes."""
    from bkn_export import wire_chain
    from bkn_export.errors import ChainWiringError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), module, nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8))  # fmt: skip
    example = torch.randn(2, 3, 8, 8)
    convert_batchnorm(model.eval(), example)
    model.train()
    if hasattr(module, "inplace"):
        module.inplace = True
        model(example)
        module.inplace = False
    change(module)
    with pytest.raises(ChainWiringError, match=rf"'2' \({type(module).__name__}\): {named}.*Wire the model again"):
        model(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wire_chain(model.eval(), example)
    model.train()(example)  # wired again at the new setting


def test_a_hook_on_a_module_list_is_not_named() -> None:
    """A ``ModuleList`` is never called, so its hooks never run: the review of the container check found a pre-hook on
    one named as a change of the prior's path."""

    class Listed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _Block(4)  # the path from its normalization enters the list's first block
            self.blocks = nn.ModuleList([_Block(4), _Block(4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = Listed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(model, torch.randn(2, 4, 8, 8))
    model.blocks.register_forward_pre_hook(lambda mod, args: None)
    assert _block_step_warnings(model) == []
    model.blocks[0].register_forward_hook(lambda mod, args, out: out * 3)  # a block the path leaves: named
    (message,) = _block_step_warnings(model)
    assert "'blocks.0': 1 forward hook(s) added" in message


@pytest.mark.parametrize(
    ("wired", "now", "refused"),
    [(float("nan"), float("nan"), False), (np.float32(0.1), np.float32(0.1), False), (np.float32(0.1), 0.5, True)],
    ids=["NaN stays NaN", "a NumPy slope kept", "a NumPy slope changed"],
)
def test_settings_are_compared_by_value(wired: float, now: float, refused: bool) -> None:
    """NaN equals NaN (a pad's value, unpickled) and a NumPy scalar is a setting too (the review's reading)."""
    from bkn_export.chain.scope import module_settings, settings_change

    pad = nn.ConstantPad2d(1, 0.0)
    pad.value = wired
    settings = module_settings(pad)
    assert settings is not None and ("value", wired) in [(k, v) for k, v in settings if k == "value"]
    pad.value = now
    assert (settings_change(pad, settings) is not None) == refused


# --------------------------------------------------------------------------- global forward hooks


def _triple_conv_outputs(module: nn.Module, args: object, out: Any) -> Any:
    return out * 3 if isinstance(module, nn.Conv2d) else None


def _triple_relu_inputs(module: nn.Module, args: Any) -> Any:
    return (args[0] * 3,) if isinstance(module, nn.ReLU) else None


@contextmanager
def _global_hook(register: Callable[[Any], RemovableHandle], hook: Any) -> Iterator[RemovableHandle]:
    """A global forward (pre-)hook, removed on exit whatever happens (it runs around every module of the process)."""
    handle = register(hook)
    try:
        yield handle
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("register", "hook", "named"),
    [
        (register_module_forward_hook, _triple_conv_outputs, "every module: 1 global forward hook(s) added"),
        (register_module_forward_pre_hook, _triple_relu_inputs, "every module: 1 global forward pre-hook(s) added"),
    ],
    ids=["forward hook", "forward pre-hook"],
)
def test_a_global_hook_added_after_wiring_is_named_at_the_first_train_step(
    register: Callable[[Any], RemovableHandle], hook: Any, named: str
) -> None:
    """A global hook (``register_module_forward_hook``) registered after wiring runs around every module a prior goes
    through: ×3 on each conv's output changes what the path carries, and the chain kept predicting the network as
    wired with no word (only wiring looked at global hooks). The first train step names it, once per model."""
    model = _converted()
    with _global_hook(register, hook):
        (message,) = _train_step_warnings(model)
        assert named in message and "wire the chain again" in message
        assert _train_step_warnings(model) == []


def test_a_global_hook_removed_after_wiring_is_named() -> None:
    """A ×3 global hook present at wiring is a step of every conv on a path; removed, it still is."""
    with _global_hook(register_module_forward_hook, _triple_conv_outputs) as handle:
        model = _converted()
        handle.remove()
        (message,) = _train_step_warnings(model)
    assert "every module: 1 global forward hook(s) removed" in message


def test_a_global_hook_removed_and_registered_again_is_named() -> None:
    """Registered again, a hook has a new key, and which hook it is cannot be told: both changes are named."""
    with _global_hook(register_module_forward_hook, _triple_conv_outputs) as handle:
        model = _converted()
        handle.remove()
        with _global_hook(register_module_forward_hook, _triple_conv_outputs):
            (message,) = _train_step_warnings(model)
    assert "every module: 1 global forward hook(s) added, 1 global forward hook(s) removed" in message


def test_global_hooks_as_wired_are_not_named() -> None:
    """Nothing changed (no global hook; one present at wiring and at every step; one registered and removed between
    two steps, the keys as wired again; torch's ``ModuleTracker`` hooks, which ``FlopCounterMode`` registers around a
    step and which only read): no warning."""
    from torch.utils.flop_counter import FlopCounterMode

    assert _train_step_warnings(_converted()) == []
    with _global_hook(register_module_forward_hook, _triple_conv_outputs):
        model = _converted()
        assert _train_step_warnings(model) == []
        with _global_hook(register_module_forward_pre_hook, _triple_relu_inputs):
            pass
        assert _train_step_warnings(model) == []
        with FlopCounterMode(display=False):
            assert _train_step_warnings(model) == []


@pytest.mark.parametrize(
    ("at_wiring", "now", "named"),
    [
        (0, 1, "every module: 1 global forward hook(s) added (wired in another process)"),
        (1, 0, "every module: 1 global forward hook(s) removed (wired in another process)"),
        (1, 1, None),
    ],
    ids=["added", "removed", "as many"],
)
def test_global_hooks_wired_in_another_process_are_compared_by_number(
    at_wiring: int, now: int, named: str | None
) -> None:
    """A hook's key counts the hooks of its own process: a model pickled with its global hooks' keys and loaded in
    another process met a different hook under the same key there, and nothing was said (a review of 2026-12-08). Keys
    taken in another process are not compared; how many hooks there are is (one replaced by another: not seen)."""
    from bkn_export.chain.scope import GlobalHooks

    model = _converted()
    roots = {layer.chain.root for layer in model.modules() if getattr(getattr(layer, "chain", None), "root", None)}
    (root,) = roots
    root.global_hooks = GlobalHooks(frozenset(), frozenset(range(1000, 1000 + at_wiring)), process="another process")
    with contextlib.ExitStack() as stack:
        for _ in range(now):
            stack.enter_context(_global_hook(register_module_forward_hook, _triple_conv_outputs))
        found = _train_step_warnings(model)
    if named is None:
        assert found == []
    else:
        (message,) = found
        assert named in message


@pytest.mark.parametrize("layout", ["current", "without global hooks"])
def test_a_pickled_root_compares_global_hooks_as_its_layout_allows(layout: str, monkeypatch: Any) -> None:
    """A whole-model pickle keeps the global hooks as wired, and its copies compare them; one saved before they were
    kept (its root's three constructor arguments) loads, trains and compares none."""
    import copy
    import io

    from bkn_export.chain.scope import ChainRoot

    def reduce_before_global_hooks(root: ChainRoot) -> tuple[type[ChainRoot], tuple[Any, ...]]:
        return ChainRoot, (root.watched, root.hooks, root.settings)

    model = _converted()
    if layout == "without global hooks":
        monkeypatch.setattr(ChainRoot, "__reduce__", reduce_before_global_hooks)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.undo()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with _global_hook(register_module_forward_hook, _triple_conv_outputs):
        for trained in (loaded, copy.deepcopy(loaded)):
            found = _train_step_warnings(trained)
            if layout == "current":
                (message,) = found
                assert "every module: 1 global forward hook(s) added" in message
            else:
                assert found == []


class _Tap(nn.Module):
    """A block that returns its input (a feature tap that keeps a buffer): the recording has no step for it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _passing(through: Callable[[], nn.Module]) -> nn.Sequential:
    """Source layer '1' → ReLU → the pass-through module '3' → conv '4' → layer '5'."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), through(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    return model


class _Double(nn.Module):
    """A block computing with tensor operators: its ``× 2`` is a step of the path that names no module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


_PASS_THROUGH = pytest.mark.parametrize(
    "through",
    [_Tap, nn.Identity, lambda: nn.Sequential(_Tap()), _Double],
    ids=["block", "nn.Identity", "container", "computing block"],
)


@_PASS_THROUGH
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m.register_forward_hook(lambda mod, args, out: out * 3), "'3': 1 forward hook(s) added"),
        (lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] * 3,)), "'3': 1 forward pre-hook(s) added"),
    ],
    ids=["forward hook", "pre-hook"],
)
def test_a_hook_added_after_wiring_on_a_pass_through_module_is_named(
    through: Callable[[], nn.Module], change: Callable[[nn.Module], object], named: str
) -> None:
    """A module on the path that returned its input unchanged records no step (one computing with tensor operators
    records steps that name no module), and its hooks were not compared: a ×3 hook on it after wiring left the prior's
    variance 1/9 of the layer's batch variance (0.11 against 1.02), with no word (a review of 2026-12-08 measured
    0.26 against 0.95). The first train step now names it."""
    model = _passing(through)
    assert "'3'" not in model[5].chain.wiring.sources[0].describe()  # no step: the path is unchanged
    assert _train_step_warnings(model) == []
    change(model[3])
    (message,) = _train_step_warnings(model)
    assert named in message


def _convert_quietly(model: nn.Module) -> nn.Module:
    """``model`` converted and wired on a (2, 3, 8, 8) example, its wiring warnings ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    return model


class _Second(nn.Module):
    """Passes the path's value on in second place: returns ``(summary, x)`` from ``x``, or ``x`` from ``(mask, x)``."""

    def forward(self, first: torch.Tensor, second: torch.Tensor | None = None) -> Any:
        return (first.mean(), first) if second is None else second


class _PassedSecond(nn.Module):
    """Source ``bn0`` → ReLU → ``passing`` (the value its second output, or its second argument) → conv → ``bn1``."""

    def __init__(self, place: str) -> None:
        super().__init__()
        self.place = place
        self.conv0, self.bn0, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.passing, self.conv1, self.bn1 = _Second(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn0(self.conv0(x)))
        y = self.passing(y)[1] if self.place == "output" else self.passing(torch.ones_like(y[:, :1]), y)
        return self.bn1(self.conv1(y))


@pytest.mark.parametrize("place", ["output", "argument"])
def test_a_value_passed_through_in_second_place_is_compared_too(place: str) -> None:
    """A module that returns ``(summary, x)`` (or takes ``(mask, x)`` and returns ``x``) passes the path's value on in
    second place; only first inputs and outputs were looked at, so a ×3 hook on it after wiring was not named (a
    review measured the prior's variance at 0.11 of the batch's, against 0.95)."""
    torch.manual_seed(0)
    model = _convert_quietly(_PassedSecond(place))
    assert model.bn1.chain.wiring.passed == ("passing",)
    assert _train_step_warnings(model) == []
    if place == "output":
        model.passing.register_forward_hook(lambda mod, args, out: (out[0], out[1] * 3))
    else:
        model.passing.register_forward_hook(lambda mod, args, out: out * 3)
    (message,) = _train_step_warnings(model)
    assert "'passing': 1 forward hook(s) added" in message


class _Combining(nn.Module):
    """Source ``bn0`` → ReLU → ``m``, a module computing with tensor operators that record a sum, a concatenation or
    a pad (no step names it) → conv → ``bn1``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv0, self.bn0, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.m = _Combine(how)
        inputs, padding = (16, 1) if how == "concat" else (8, 0 if how == "pad" else 1)
        self.conv1, self.bn1 = nn.Conv2d(inputs, 8, 3, padding=padding), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn0(self.conv0(x)))
        return self.bn1(self.conv1(self.m(y)))


class _Combine(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.how == "sum":
            return y + 2 * y
        if self.how == "concat":
            return torch.cat([y, 2 * y], 1)
        return torch.nn.functional.pad(y, (1, 1, 1, 1))


@pytest.mark.parametrize("how", ["sum", "concat", "pad"])
def test_a_module_returning_a_sum_concat_or_pad_is_compared(how: str) -> None:
    """Only modules returning a recorded step's value were noted: one returning ``a + b``, ``torch.cat`` or ``F.pad``
    (folded into the next conv) was not, and a ×3 hook on it left the prior's variance a ninth of the batch's with no
    word (a review of 2026-12-08)."""
    torch.manual_seed(0)
    model = _convert_quietly(_Combining(how))
    assert model.bn1.chain.wiring.passed == ("m",)
    model.m.register_forward_hook(lambda mod, args, out: out * 3)
    (message,) = _train_step_warnings(model)
    assert "'m': 1 forward hook(s) added" in message


class _Down(nn.Module):
    """A U-Net encoder block holding both layers: it returns ``(pooled, skip)``, the skip a value of ``bn2``'s path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = torch.relu(self.bn1(self.conv1(x)))
        return torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(skip))), 2), skip


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = _Down()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, skip = self.down(x)
        return pooled.sum() + skip.sum()


def test_a_block_holding_the_layer_is_not_compared_for_returning_a_value_of_its_path() -> None:
    """The block returns its skip feature, a value of ``bn2``'s path, after ``bn2`` ran: a hook on it (a feature
    capture) cannot change that prior, and is not named (it was, for a moment of 2026-12-08's session)."""
    torch.manual_seed(0)
    model = _convert_quietly(_Encoder())
    assert "down" not in model.down.bn2.chain.wiring.passed
    model.down.register_forward_hook(lambda mod, args, out: (out[0], out[1] * 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()(torch.randn(4, 3, 8, 8)).backward()
    assert not [w for w in caught if "other forward hooks than when the chain was wired" in str(w.message)]


def test_a_hook_on_a_pass_through_module_at_wiring_is_named() -> None:
    """A hook on it at wiring is followed as recorded (its ×3 a step of the path), which the wiring warning says."""

    def prepare(model: nn.Sequential) -> None:
        model[3].register_forward_hook(lambda mod, args, out: out * 3)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Identity(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )  # fmt: skip
    prepare(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    (message,) = [str(w.message) for w in caught if "forward hooks on modules the Kalman chain" in str(w.message)]
    assert "'3' (0 pre-hook(s), 1 hook(s))" in message


@_PASS_THROUGH
def test_a_pickled_or_copied_model_compares_a_pass_through_modules_hooks(through: Callable[[], nn.Module]) -> None:
    """A whole-model pickle and a deep copy keep the pass-through modules; one pickled before the chain kept them (its
    wiring and membership lack the fields) trains, comparing the others."""
    import copy
    import io

    def pickled(model: nn.Module) -> nn.Module:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    for kept in (pickled(_passing(through)), copy.deepcopy(_passing(through))):
        kept[3].register_forward_hook(lambda mod, args, out: out * 3)
        (message,) = _train_step_warnings(kept)
        assert "'3': 1 forward hook(s) added" in message
    older = _passing(through)
    object.__delattr__(older[5].chain.wiring, "passed")  # as unpickled from before: the class default, ()
    object.__delattr__(older[5].chain, "_hooked")
    older = pickled(older)
    assert _train_step_warnings(older) == []
    older[4].register_forward_hook(lambda mod, args, out: out * 3)
    assert "'4': 1 forward hook(s) added" in _train_step_warnings(older)[0]


@pytest.mark.parametrize("saved_by", ["this version", "a writer that keeps the pass-through modules"])
def test_a_checkpoint_loads_whether_or_not_it_names_pass_through_modules(saved_by: str) -> None:
    """The pass-through modules are not kept in a checkpoint (what an earlier bkn_export saved and reads): a
    checkpoint saved now is the earlier format, and loads in a model wired now with no error or warning; a saved
    wiring that names them loads as well."""
    from bkn_export import extra_state

    state = _passing(_Tap).state_dict()
    saved = extra_state.decode(state["5._extra_state"])
    assert "passed" not in saved["wiring"]
    if saved_by != "this version":
        state["5._extra_state"] = extra_state.encode({**saved, "wiring": {**saved["wiring"], "passed": ["3"]}})
    model = _passing(_Tap)
    assert model[5].chain.wiring.passed == ("3",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(state)
    assert _train_step_warnings(model) == []
