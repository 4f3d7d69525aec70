"""A product with a module's scalar or per-channel tensor on a path (ReZero / SkipInit's gain ``h * self.alpha``,
LayerScale's ``h * self.gamma.view(1, -1, 1, 1)``) is a :class:`~bkn_export.chain.steps.ParameterScale` step: the
factor is read at every call, so a learned or scheduled one is followed, and the prior's gradient reaches it. Before
(QA of 2026-12-07, third session) such a product made the layer after it first in its chain, and a Python number in
its place is recorded as the constant it was at wiring (README)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from bkn_export import chain_statistics, convert_batchnorm, format_chain
from bkn_export.errors import ChainWiringError
from bkn_export.export import export_onnx
from runtime.parity import run_parity


class _Scaled(nn.Module):
    """``bn2(relu(bn1(conv1 x)) · a)``, ``a`` a float, a 0-dim parameter (of this module or a submodule), a
    per-channel parameter (viewed to (1, C, 1, 1), indexed to (C, 1, 1) from the left, or multiplied in place)."""

    def __init__(self, kind: str, value: float = 3.0) -> None:
        super().__init__()
        self.kind = kind
        self.conv1, self.bn1, self.bn2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        if kind == "float":
            self.alpha: float | nn.Parameter = value
        elif kind == "scalar":
            self.alpha = nn.Parameter(torch.tensor(value))
        elif kind == "submodule":  # a factor another module holds, read in this forward
            self.holder = nn.Module()
            self.holder.alpha = nn.Parameter(torch.tensor(value))
        else:
            self.alpha = nn.Parameter(torch.full((6,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        if self.kind == "view":
            assert isinstance(self.alpha, torch.Tensor)
            h = h * self.alpha.view(1, -1, 1, 1)
        elif self.kind == "index":
            assert isinstance(self.alpha, torch.Tensor)
            h = self.alpha[:, None, None] * h
        elif self.kind == "submodule":
            h = h * self.holder.alpha
        elif self.kind == "inplace":
            assert isinstance(self.alpha, torch.Tensor)
            h = h.mul_(self.alpha.reshape(6, 1, 1))
        else:
            h = h * self.alpha
        return self.bn2(h)


def _converted(kind: str, value: float = 3.0) -> nn.Module:
    torch.manual_seed(0)
    model = _Scaled(kind, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_batchnorm(model, torch.randn(4, 3, 8, 8))


def _bn2_row_after_converting(model: nn.Module) -> str:
    """``model`` converted (warnings silenced) on a (4, 3, 8, 8) example; its ``format_chain`` row of ``bn2``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(model, torch.randn(4, 3, 8, 8))
    (row,) = [line for line in format_chain(model).splitlines() if line.startswith("bn2")]
    return row


def _prior(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    layer = chain_statistics(model, torch.randn(8, 3, 8, 8))[1]
    assert layer.name == "bn2" and layer.prior_mean is not None and layer.prior_variance is not None
    return layer.prior_mean, layer.prior_variance


@pytest.mark.parametrize("kind", ["scalar", "view", "index", "inplace", "submodule"])
def test_a_parameter_factor_is_a_step_of_the_path_and_predicts_as_the_number_would(kind: str) -> None:
    model = _converted(kind)
    assert ("× 'holder.alpha'" if kind == "submodule" else "× 'alpha'") in format_chain(model)
    mean, variance = _prior(model)
    expected_mean, expected_variance = _prior(_converted("float"))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-6, atol=1e-7)


def test_a_changed_factor_is_followed() -> None:
    """The factor is read at every call: set to 1 (a warm-up schedule), the prior is that of a chain wired at 1,
    where a Python number would have stayed at its recorded 3."""
    model = _converted("scalar", 3.0)
    with torch.no_grad():
        model.alpha.fill_(1.0)
    mean, variance = _prior(model)
    expected_mean, expected_variance = _prior(_converted("float", 1.0))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-6, atol=1e-7)
    stale_mean, _ = _prior(_converted("float", 3.0))
    assert not torch.allclose(mean, stale_mean)


def test_the_priors_gradient_reaches_the_factor() -> None:
    """BatchNorm's output does not depend on the scale of its input (but for eps, made tiny here), so without a prior
    the factor's gradient is about 0; the prior's share of it is not."""

    def alpha_gradient(prior_weight: float | None) -> float:
        torch.manual_seed(0)
        model = _Scaled("scalar")
        model.bn2.eps = 1e-10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_batchnorm(model, torch.randn(4, 3, 8, 8), prior_weight=prior_weight)
        torch.manual_seed(2)
        (model.train()(torch.randn(4, 3, 8, 8)) ** 3).sum().backward()
        assert isinstance(model.alpha, torch.Tensor) and model.alpha.grad is not None
        return float(model.alpha.grad.abs())

    without, wired = alpha_gradient(0.0), alpha_gradient(None)
    assert wired > 1e-2 and without < 1e-3 * wired  # float32 rounding of a sum of 1536 cubes: about 1e-4


def test_a_checkpoint_round_trips_and_a_training_export_agrees(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    model = _converted("view")
    fresh = _converted("view", 1.0)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_prior(fresh)[1], _prior(model)[1], rtol=0.0, atol=0.0)
    example = torch.randn(4, 3, 8, 8)
    path = tmp_path / "scaled_training.onnx"
    export_onnx(model, example, path, mode="training")
    report = run_parity(model, path, {"x": example.numpy()}, runtimes="ort:cpu:all,reference", mode="training")
    assert report.passed, report.runtimes


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, child: str = "net") -> None:
        super().__init__()
        self.child = child
        self.add_module(child, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.child)(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("child", ["net", "alpha"])
def test_a_factor_of_the_wrapped_models_root_moves_between_wrapped_and_bare_checkpoints(child: str) -> None:
    """A review: the factor's owner is the wrapped model's root ('net' under the wrapper, '' alone), and the root
    prefix was stripped from names under it only: the checkpoint moved in neither direction. A second review: with
    the wrapper's child named as the factor's attribute ('alpha'), the step's attribute name was stripped as a
    module name, to ''."""
    torch.manual_seed(0)
    wrapped = _Wrapped(_Scaled("scalar"), child)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(wrapped, torch.randn(4, 3, 8, 8))
    bare = _converted("scalar", 1.0)
    bare.load_state_dict({k.removeprefix(f"{child}."): v for k, v in wrapped.state_dict().items()}, strict=True)
    wrapped.load_state_dict({f"{child}.{k}": v for k, v in _converted("scalar").state_dict().items()}, strict=True)


class _ChangesItsFactor(_Scaled):
    """``h · s``, then ``s`` halved in place while the layer runs (and restored after): the product used the old
    value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.alpha, torch.Tensor)
        h = torch.relu(self.bn1(self.conv1(x))) * self.alpha
        with torch.no_grad():
            self.alpha.mul_(0.5)
        y = self.bn2(h)
        with torch.no_grad():
            self.alpha.mul_(2.0)
        return y


def test_a_factor_written_in_place_after_its_product_is_not_followed() -> None:
    """A review: the step read the factor when the layer predicted, after the forward had halved it: prior mean 0.5×,
    variance 0.25× the truth, no note. The layer after such a product is now first in its chain, saying why."""
    torch.manual_seed(0)
    model = _ChangesItsFactor("scalar")
    row = _bn2_row_after_converting(model)
    assert "first in chain" in row and "its factor × 'alpha' was changed in place later in the forward" in row


class _Expanded(_Scaled):
    """``h · g[:1].expand(C)``: a view of the whole of ``g`` in memory size, but its first value repeated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        assert isinstance(self.alpha, torch.Tensor)
        return self.bn2(h * self.alpha[:1].expand(6).view(1, -1, 1, 1))


_UNSEEN_CHANGES: dict[str, tuple[Callable[[nn.Module], object], Callable[[nn.Module], object]]] = {
    # (the change before the layer, the change back after it): the product and the next forward see the old value
    "foreach": (lambda m: torch._foreach_mul_([m.alpha], 0.5), lambda m: torch._foreach_mul_([m.alpha], 2.0)),
    "set_": (lambda m: m.alpha.set_(m.alpha.detach() * 0.5), lambda m: m.alpha.set_(m.alpha.detach() * 2.0)),
    "data": (
        lambda m: setattr(m.alpha, "data", m.alpha.data * 0.5),
        lambda m: setattr(m.alpha, "data", m.alpha.data * 2),
    ),
    "rebound": (
        lambda m: setattr(m, "alpha", nn.Parameter(m.alpha.detach() * 0.5)),
        lambda m: setattr(m, "alpha", nn.Parameter(m.alpha.detach() * 2.0)),
    ),
}


class _ChangesItsFactorUnseen(_Scaled):
    """``h · s``, then ``s`` changed by what the recorder does not see as an in-place write to its bytes, and back
    after the layer ran."""

    def __init__(self, change: str) -> None:
        super().__init__("scalar")
        self.change = change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = _UNSEEN_CHANGES[self.change]
        h = torch.relu(self.bn1(self.conv1(x))) * self.alpha
        with torch.no_grad():
            before(self)
        y = self.bn2(h)
        with torch.no_grad():
            after(self)
        return y


@pytest.mark.parametrize("change", sorted(_UNSEEN_CHANGES))
def test_a_factor_changed_by_an_unrecorded_write_or_a_rebinding_is_not_followed(change: str) -> None:
    """A review: ``torch._foreach_mul_([a], k)`` (a list argument: no in-place write seen), ``a.set_``, ``a.data =``
    and a re-assigned attribute between the product and the layer left the step in place: prior mean 0.5×, variance
    0.25× the truth, no note. The recorder now compares each factor with the tensor, address and bytes the product
    read before every normalization call and after the forward."""
    torch.manual_seed(0)
    model = _ChangesItsFactorUnseen(change)
    row = _bn2_row_after_converting(model)
    assert "first in chain" in row and "its factor × 'alpha' was changed later in the forward" in row, row


def test_a_view_that_repeats_one_value_is_no_parameter_scale() -> None:
    """A review: accepted as ``× 'alpha'`` where ``alpha`` was still constant (LayerScale's initialisation); once it
    trains, the prior would be off per channel. Refused (stride 0), the layer first in its chain, saying why."""
    torch.manual_seed(0)
    model = _Expanded("view")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(model, torch.randn(4, 3, 8, 8))
    text = format_chain(model)
    assert "× 'alpha'" not in text and "neither a per-channel gate computed from x nor a whole parameter" in text


def test_a_checkpoint_whose_layer_was_first_in_its_chain_says_how_to_keep_its_weights() -> None:
    """A checkpoint of a LayerScale model saved before this step existed (its layer first in its chain; simulated by
    an unwired copy) is refused; the error says how to keep its weights, and that way loads them."""
    from bkn_export.errors import ChainWiringError

    class _Detached(_Scaled):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert isinstance(self.alpha, torch.Tensor)
            return self.bn2(torch.relu(self.bn1(self.conv1(x))) * self.alpha.detach().view(1, -1, 1, 1))

    torch.manual_seed(0)
    old = _Detached("view")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_batchnorm(old, torch.randn(4, 3, 8, 8))
    assert "× 'alpha'" not in format_chain(old)
    state = old.state_dict()
    model = _converted("view", 1.0)
    with pytest.raises(ChainWiringError, match=r"saved by an earlier bkn_export.*endswith\('_extra_state'\)"):
        model.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
        missing = model.load_state_dict(weights, strict=False)
    assert set(missing.missing_keys) == {"bn2.prior_weight_logit", "bn2.process_noise_raw", "bn2._extra_state"}
    assert torch.equal(model.alpha, old.alpha)


class _SharedStorage(_Scaled):
    """Two parameters on one flat storage (FSDP / DeepSpeed / apex style), one written in place (by 1: the values stay,
    the write is recorded) after the product with the other, or the factor itself."""

    def __init__(self, written: str) -> None:
        super().__init__("view")
        flat = torch.cat([torch.full((6,), 3.0), torch.ones(6)])
        del self.alpha
        self.alpha, self.other = nn.Parameter(flat[:6]), nn.Parameter(flat[6:])
        self.written = written

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x))) * self.alpha.view(1, -1, 1, 1)
        with torch.no_grad():
            getattr(self, self.written).mul_(1.0)
        return self.bn2(h)


@pytest.mark.parametrize(("written", "kept"), [("other", True), ("alpha", False)])
def test_only_a_write_to_the_factors_own_bytes_drops_the_step(written: str, kept: bool) -> None:
    """A review: the in-place check compared storages, so a write to another parameter of one flat storage made the
    layer first in its chain though its factor never changed. Only a write reaching the factor's own bytes does."""
    torch.manual_seed(0)
    model = _SharedStorage(written)
    assert model.alpha.untyped_storage().data_ptr() == model.other.untyped_storage().data_ptr()
    row = _bn2_row_after_converting(model)
    assert ("× 'alpha'" in row and "propagate" in row) if kept else "first in chain" in row


def test_a_root_factor_of_another_size_after_wiring_is_named_as_the_model_holds_it() -> None:
    """The root module's factor replaced by one of another size after wiring: a clear error naming ``'alpha'`` (a
    review found ``'.alpha'``: the root's empty owner joined with a dot)."""
    model = _converted("scalar")
    model.alpha = nn.Parameter(torch.ones(1, 1, 1, 8))  # the product still runs: broadcast over the width
    with pytest.raises(ChainWiringError, match=r"step × 'alpha': 'alpha' is \(1, 1, 1, 8\), not the tensor of 1 or 6"):
        model.train()(torch.randn(2, 3, 8, 8))


class _Holder(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(value))


class _Block(nn.Module):
    def __init__(self, holder: nn.Module) -> None:
        super().__init__()
        self.h = holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.h.alpha  # type: ignore[no-any-return]


class _HeldElsewhere(nn.Module):
    """``bn2(relu(bn1(conv1 x)) · alpha)``, alpha held by a module the root registers as ``shared`` and ``blk`` as
    ``h``; ``swap``: the holder is replaced between the product and bn2 (and put back after)."""

    def __init__(self, swap: bool) -> None:
        super().__init__()
        self.swap = swap
        self.shared = _Holder(3.0)
        self.conv1, self.bn1, self.bn2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.blk = _Block(self.shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blk(torch.relu(self.bn1(self.conv1(x))))
        held = self.blk.h
        if self.swap:
            self.blk.h = _Holder(1.5)
        y = self.bn2(h)
        self.blk.h = held
        return y  # type: ignore[no-any-return]


@pytest.mark.parametrize("swap", [False, True])
def test_a_factor_read_through_a_second_name_is_followed_and_a_swapped_holder_is_not(swap: bool) -> None:
    """A review: a factor read as ``blk.h.alpha`` (its module registered first as ``shared``) was dropped, its owner
    missing from the de-duplicated module names; a holder re-assigned between the product and the layer was not
    seen (the prior read the new holder's factor: mean 0.5×, variance 0.25×). Owners are now looked up live, by
    the name the prediction uses."""
    torch.manual_seed(0)
    model = _HeldElsewhere(swap)
    row = _bn2_row_after_converting(model)
    if swap:
        assert "first in chain" in row and "its factor × 'blk.h.alpha' was changed later in the forward" in row, row
    else:
        assert "× 'blk.h.alpha'" in row and "first in chain" not in row, row
        model.train()(torch.randn(2, 3, 8, 8)).sum().backward()
        assert model.shared.alpha.grad is not None
