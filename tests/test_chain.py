"""Specification of the chain's wiring, transitions, checkpoints and ``chain_statistics``.

* a layer's prior is its sources' Gaussians pushed through the real modules between them
  and the layer: checked against a Monte Carlo of those modules, positions drawn i.i.d.
  from the sources (SiLU, average pooling, reflect padding, concatenation, residual sum);
* ``KalmanOptions.prior_source`` and ``residual`` reach the wiring and the checkpoint;
* fallbacks are never silent (hand-built records);
* checkpoints of the version-1 wiring load when equivalent, else say to re-convert;
* ``chain_statistics`` changes no parameter, buffer, mode or RNG state.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import (
    ChainWiringError,
    KalmanOptions,
    LayerStatistics,
    chain_statistics,
    convert_batchnorm,
    describe_chain,
    extra_state,
    format_chain,
)
from bkn_export.chain import plan_wiring
from bkn_export.chain.record import Combination, LayerRecord, SourcePath
from bkn_export.chain.steps import Affine, Elementwise

DATA = Path(__file__).parent / "data"


class Net(nn.Module):
    """A stem, two branches (SiLU + average pooling; ReLU + average pooling) concatenated
    into a reflect-padded conv, then a residual block whose sum feeds the last norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(8, 5, 1)
        self.bn_b = nn.BatchNorm2d(5)
        self.conv_c = nn.Conv2d(11, 8, 3, padding=1, padding_mode="reflect")
        self.bn_c = nn.BatchNorm2d(8)
        self.conv_d = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_d = nn.BatchNorm2d(8)
        self.bn_e = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn0(self.stem(x))
        a = self.bn_a(self.conv_a(F.avg_pool2d(F.silu(h), 2)))
        b = self.bn_b(self.conv_b(F.avg_pool2d(torch.relu(h), 2)))
        c = self.bn_c(self.conv_c(torch.cat([torch.relu(a), F.hardswish(b)], dim=1)))
        d = self.bn_d(self.conv_d(torch.relu(c)))
        return self.bn_e(torch.relu(d + c))


def _net(**options: Any) -> nn.Module:
    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():  # non-trivial γ, β so that the two prior conventions differ
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.5)
    return convert_batchnorm(model, _inputs(), process_noise=False, **options)


def _inputs(n: int = 4) -> Tensor:
    return 1.5 * torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.3


#: Per layer: the real modules between its sources and its input, as a function of one
#: i.i.d. sample per source (in the order of LayerStatistics.sources).
def _paths(model: nn.Module) -> dict[str, Callable[..., Tensor]]:
    m: Any = model
    return {
        "bn_a": lambda h: m.conv_a(F.avg_pool2d(F.silu(h), 2)),
        "bn_b": lambda h: m.conv_b(F.avg_pool2d(torch.relu(h), 2)),
        "bn_c": lambda a, b: m.conv_c(torch.cat([torch.relu(a), F.hardswish(b)], dim=1)),
        "bn_d": lambda c: m.conv_d(torch.relu(c)),
        "bn_e": lambda d, c: torch.relu(d + c),
    }


def _monte_carlo(layer: LayerStatistics, path: Callable[..., Tensor], draws: int = 256) -> tuple[Tensor, Tensor]:
    """Mean and variance per channel of the path's output, positions drawn i.i.d. from the sources."""
    generator = torch.Generator().manual_seed(11)
    samples = []
    for source in layer.sources:
        shape = (draws, *source.shape[1:])
        view = (1, -1, *([1] * (len(shape) - 2)))
        noise = torch.randn(shape, generator=generator, dtype=source.mean.dtype)
        samples.append(source.mean.reshape(view) + source.variance.sqrt().reshape(view) * noise)
    with torch.no_grad():
        out = path(*samples)
    dims = [0, *range(2, out.dim())]
    return out.mean(dim=dims), out.var(dim=dims, correction=0)


@pytest.mark.parametrize("prior_source", ["input", "output"])
@pytest.mark.parametrize("layer_name", ["bn_a", "bn_b", "bn_c", "bn_d", "bn_e"])
def test_propagated_prior_matches_a_monte_carlo_of_the_real_modules(prior_source: str, layer_name: str) -> None:
    """Within 10 % in mean (of the largest |mean| or std) and in variance (per channel)."""
    model = _net(prior_source=prior_source)
    layers = {s.name: s for s in chain_statistics(model, _inputs())}
    layer = layers[layer_name]
    assert layer.transition == "propagate" and layer.prior_mean is not None and layer.prior_variance is not None
    mc_mean, mc_variance = _monte_carlo(layer, _paths(model)[layer_name])
    scale = torch.maximum(mc_mean.abs().max(), mc_variance.sqrt().max())
    assert float((layer.prior_mean - mc_mean).abs().max() / scale) < 0.10
    assert float(((layer.prior_variance - mc_variance) / mc_variance).abs().max()) < 0.10


def test_sources_are_named_with_the_shape_they_enter_at() -> None:
    model = _net()
    layers = {s.name: s for s in chain_statistics(model, _inputs(2))}
    assert [(s.name, s.shape) for s in layers["bn_c"].sources] == [("bn_a", (2, 6, 4, 4)), ("bn_b", (2, 5, 4, 4))]
    assert [s.name for s in layers["bn_e"].sources] == ["bn_d", "bn_c"]
    first = layers["bn0"]
    assert first.transition is None and first.sources == () and first.prior_mean is None
    assert torch.equal(first.prior_weight, torch.zeros(8, dtype=torch.float64))


def test_prior_source_output_pushes_the_normalized_output_moments() -> None:
    """'input' pushes the source's posterior; 'output' its normalized output γ(x-μ)/sqrt(Σ+ε)+β: N(≈β, ≈γ²)."""
    inputs = {s.name: s for s in chain_statistics(_net(prior_source="input"), _inputs())}
    outputs = {s.name: s for s in chain_statistics(_net(prior_source="output"), _inputs())}
    source_in, source_out = inputs["bn_d"].sources[0], outputs["bn_d"].sources[0]
    bn_c = inputs["bn_c"]
    torch.testing.assert_close(source_in.mean, bn_c.posterior_mean)
    torch.testing.assert_close(source_in.variance, bn_c.posterior_variance)
    layer = _net().get_submodule("bn_c")
    weight, bias = layer.weight.detach(), layer.bias.detach()
    posterior = outputs["bn_c"].posterior_variance  # bn_c's own prior differs between the conventions
    torch.testing.assert_close(source_out.mean, bias)
    torch.testing.assert_close(source_out.variance, weight * weight * posterior / (posterior + layer.eps))


def test_learned_sampled_and_identity_transitions_run_on_the_same_wiring() -> None:
    for transition in ("learned", "sampled"):
        model = _net(transition=transition)
        layers = {s.name: s for s in chain_statistics(model, _inputs())}
        assert layers["bn_c"].transition == transition and layers["bn_c"].prior_mean is not None
    assert _net(transition="learned").get_parameter("bn_c.transition_matrix").shape == (8, 11)


def test_residual_branch_option_keeps_only_the_branch_and_says_so() -> None:
    model = _net(residual="branch")
    link = next(link for link in describe_chain(model) if link.name == "bn_e")
    assert link.sources == ("'bn_d' → relu()",) and link.combine == "single"
    assert "residual='branch': dropped the shortcut 'bn_c'" in link.note
    layers = {s.name: s for s in chain_statistics(model, _inputs())}
    assert [s.name for s in layers["bn_e"].sources] == ["bn_d"]


def test_describe_chain_names_every_source_step_and_approximation() -> None:
    model = _net()
    links = {link.name: link for link in describe_chain(model)}
    assert links["bn_a"].sources == ("'bn0' → silu() → avg_pool2d(kernel (2, 2)) → conv 'conv_a'",)
    assert links["bn_c"].sources == ("concat('bn_a' → relu() | 'bn_b' → hardswish()) → conv 'conv_c'",)
    assert links["bn_e"].sources == ("sum('bn_d' + 'bn_c') → relu()",)
    assert any("silu" in a and "Gauss–Hermite" in a for a in links["bn_a"].approximations)
    rows = {line.split()[0]: line for line in format_chain(model).splitlines()[1:]}
    assert "concat('bn_a' → relu() | 'bn_b' → hardswish())" in rows["bn_c"]
    assert "approximate: silu()" in rows["bn_a"]


def test_max_pooling_is_named_as_an_approximation() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.MaxPool2d(2), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model = convert_batchnorm(model, torch.randn(2, 3, 6, 6))
    (approximation,) = describe_chain(model)[1].approximations
    assert approximation.startswith("max_pool2d") and "approximated" in approximation


# --------------------------------------------------------------------------- plan_wiring on hand-built records


def _path(normalization: str | None, channels: int, *steps: Any, fallback: str = "") -> SourcePath:
    return SourcePath(normalization, tuple(steps), channels, (2, channels, 4, 4), fallback=fallback)


FEATURES = {"a": 4, "b": 4, "layer": 8}
ORDER = {"a": 0, "b": 1, "layer": 2}


def test_a_concatenation_part_without_normalization_takes_batch_statistics_on_its_channels() -> None:
    record = LayerRecord(
        "layer", (2, 8, 4, 4), (_path("a", 4), _path(None, 4, fallback="reaches the model input")), "concat"
    )
    wiring = plan_wiring(record, KalmanOptions(), ORDER, FEATURES, 8)
    assert wiring.transition == "propagate" and wiring.source_names == ("a",)
    assert any("channels 4:8 have no normalization upstream along every part" in note for note in wiring.notes)


def test_a_residual_addend_without_normalization_leaves_the_layer_first_in_chain_with_a_note() -> None:
    record = LayerRecord("layer", (2, 4, 4, 4), (_path("a", 4), _path(None, 4, fallback="an opaque op")), "sum")
    wiring = plan_wiring(record, KalmanOptions(), ORDER, FEATURES, 4)
    assert wiring.transition is None
    assert any("propagate unavailable (addend 1 does not reach a normalization" in note for note in wiring.notes)


def test_identity_needs_matching_channels() -> None:
    record = LayerRecord("layer", (2, 8, 4, 4), (_path("a", 8, Affine("conv")),), "single")
    with pytest.raises(
        ChainWiringError, match=r"identity' needs equal channel counts, but 'a' has 4 and 'layer' has 8"
    ):
        plan_wiring(record, KalmanOptions(transition="identity"), ORDER, FEATURES, 8)


def test_branch_rule_follows_sums_inside_paths() -> None:
    inner = Combination("sum", (_path("a", 4), _path("b", 4)))
    path = SourcePath(None, (Elementwise("relu"), Affine("conv")), 4, (2, 4, 4, 4), origin=inner)
    record = LayerRecord("layer", (2, 4, 4, 4), (path,), "single")
    wiring = plan_wiring(record, KalmanOptions(residual="branch"), ORDER, FEATURES, 4)
    (source,) = wiring.sources
    assert source.normalization == "b" and source.origin is None  # b ran after a
    assert source.steps == (Elementwise("relu"), Affine("conv"))


# --------------------------------------------------------------------------- checkpoints


def _plain_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    )


def _v1(transition: str) -> dict[str, Any]:
    saved: dict[str, Any] = torch.load(DATA / "chain_v1_state_dicts.pt")[transition]
    return saved


@pytest.mark.parametrize("transition", ["propagate", "identity"])
def test_version_1_checkpoint_loads_into_an_equivalent_wiring_and_computes_what_it_computed(transition: str) -> None:
    """Saved by the execution-order wiring (commit 9ccb94c): same outputs in train and eval mode."""
    saved = _v1(transition)
    assert saved["state_dict"]["4._extra_state"]["version"] == 1
    # version 1 had only the authors' prior (the source's input statistics)
    model = convert_batchnorm(_plain_chain(), torch.randn(2, 3, 6, 6), transition=transition, prior_source="input")
    model.load_state_dict(saved["state_dict"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(model).train()(saved["x"]), saved["train_output"])
        torch.testing.assert_close(model.eval()(saved["x"]), saved["eval_output"])


def test_version_1_checkpoint_of_another_wiring_says_to_reconvert() -> None:
    model = convert_batchnorm(_plain_chain(), torch.randn(2, 3, 6, 6), prior_source="output")
    with pytest.raises(
        ChainWiringError, match=r"BatchKalmanNorm2d '4'.*wiring format 1.*Re-convert.*convert_batchnorm"
    ):
        model.load_state_dict(_v1("propagate")["state_dict"], strict=True)


def test_version_1_checkpoint_with_a_predecessor_into_an_unwired_layer_is_refused() -> None:
    from bkn_export import BatchKalmanNorm2d

    layer = BatchKalmanNorm2d(4)
    state = {k[2:]: v for k, v in _v1("identity")["state_dict"].items() if k.startswith("4.")}
    with pytest.raises(ChainWiringError, match="this layer is not wired"):
        layer.load_state_dict(state, strict=False)


def test_checkpoint_round_trip_keeps_the_wiring_options() -> None:
    """prior_source and residual are saved (version 2) and checked on load."""
    model = _net(prior_source="output", residual="branch")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    extra = extra_state.decode(state["bn_e._extra_state"])
    assert extra["version"] == 2 and extra["options"]["prior_source"] == "output"
    assert extra["wiring"]["prior_source"] == "output" and extra["wiring"]["combine"] == "single"
    _net(prior_source="output", residual="branch").load_state_dict(state, strict=True)
    with pytest.raises(ChainWiringError, match=r"'bn_a'.*prior_source: saved 'output', this model 'input'"):
        _net(prior_source="input", residual="branch").load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- chain_statistics changes nothing


def test_chain_statistics_changes_no_state() -> None:
    model = _net(transition="sampled")  # draws random numbers
    model.add_module("drop", nn.Dropout(0.5))  # a module whose mode matters (not called)
    model.eval()
    model.bn_c.train()  # mixed modes are restored as they were
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    stats = chain_statistics(model, _inputs())
    assert [s.name for s in stats] == ["bn0", "bn_a", "bn_b", "bn_c", "bn_d", "bn_e"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


class _Resizing(nn.Module):
    """Resizes its buffer in its first forward, as a ``torch.ao`` observer (which starts empty) does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(0))

    def forward(self, x: Tensor) -> Tensor:
        self.seen.resize_(x.shape[1]).copy_(x.detach().mean((0, 2, 3)))
        return x


@pytest.mark.parametrize("fails", [False, True], ids=["runs", "the forward raises"])
def test_chain_statistics_restores_a_buffer_its_forward_resized(fails: bool) -> None:
    """A cold QA (sixth session of 2026-12-07): on a QAT-prepared model before its first forward the restore's
    ``copy_`` of a resized observer buffer raised inside the ``finally``, leaving the model in train mode with the
    running statistics the run had updated (and hiding the forward's own error). Each buffer now gets its shape and
    values back, and the modes are restored, whatever happened."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), _Resizing())  # fmt: skip
    convert_batchnorm(model.eval(), torch.randn(2, 3, 8, 8))
    model[5].seen = torch.zeros(0)  # empty again, as an observer before its first forward
    if fails:
        model.add_module("fail", nn.Linear(1, 1).eval())  # a (2, 8, 8, 8) input: the shapes do not match
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    inputs = torch.randn(2, 3, 8, 8)
    if fails:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            chain_statistics(model, inputs)
    else:
        assert [s.name for s in chain_statistics(model, inputs)] == ["1", "4"]
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            assert value.shape == before[key].shape and torch.equal(value, before[key]), key


class _Caching(nn.Module):
    """Fills a buffer registered as None and registers another in its forward (a lazily built cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", None)

    def forward(self, x: Tensor) -> Tensor:
        self.cache = x.detach().mean(0)
        if "seen" not in self._buffers:
            self.register_buffer("seen", torch.ones(1), persistent=False)
        return x


def test_chain_statistics_leaves_the_buffers_registered_as_they_were() -> None:
    """The review of that fix: a buffer that was None stayed filled and a buffer the forward registered stayed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    convert_batchnorm(model.eval(), torch.randn(2, 3, 8, 8))
    model.add_module("cache", _Caching())
    chain_statistics(model, torch.randn(2, 3, 8, 8))
    assert model.cache.cache is None and "seen" not in model.cache._buffers
    assert "seen" not in model.cache._non_persistent_buffers_set


# --------------------------------------------------------------------------- the option in the training export


def test_training_export_computes_the_normalization_aware_prior(tmp_path: Path) -> None:
    """prior_source='output' reaches the training-mode ONNX graph: ORT's posteriors are PyTorch's."""
    import onnxruntime as ort

    from bkn_export.export.training import POSTERIOR_MEAN_SUFFIX, POSTERIOR_VARIANCE_SUFFIX, export_training

    torch.manual_seed(1)
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
    with torch.no_grad():
        bn_model[1].weight.uniform_(0.5, 2.0)
        bn_model[1].bias.normal_()
    model = convert_batchnorm(bn_model, torch.randn(2, 3, 6, 6), prior_source="output")
    x = torch.randn(3, 3, 6, 6)
    path = tmp_path / "train.onnx"
    export_training(model, x, path, expose_posteriors=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()})))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got["output"]), copy.deepcopy(model).train()(x), atol=1e-5, rtol=0)
    for layer in chain_statistics(model, x):
        mean, variance = got[layer.name + POSTERIOR_MEAN_SUFFIX], got[layer.name + POSTERIOR_VARIANCE_SUFFIX]
        torch.testing.assert_close(torch.from_numpy(mean), layer.posterior_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(variance), layer.posterior_variance, atol=1e-5, rtol=0)
    # and the convention matters here: the 'input' prior gives another second posterior
    authors = convert_batchnorm(copy.deepcopy(bn_model), x, prior_source="input")
    other = {s.name: s for s in chain_statistics(authors, x)}
    assert not torch.allclose(other["3"].posterior_mean, torch.from_numpy(got["3" + POSTERIOR_MEAN_SUFFIX]))


def test_sampled_prior_draws_one_sample_per_position_and_averages_to_propagate() -> None:
    """'sampled' draws as the authors do, one (1, C, H, W) sample per micro-batch: on average its mean is
    propagate's, and its spread over draws does not shrink with the batch size (an (N, C, H, W) draw's would, by √N).
    """

    def model(transition: str) -> nn.Module:
        torch.manual_seed(3)
        bn = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)).double()
        return convert_batchnorm(bn, torch.randn(2, 4, 8, 8, dtype=torch.float64), transition=transition)

    x = 2.0 * torch.randn(16, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 1.0
    sampled = model("sampled")

    def draws(batch: Tensor) -> Tensor:
        means = []
        for seed in range(64):
            torch.manual_seed(seed)
            means.append(chain_statistics(sampled, batch)[1].prior_mean)
        return torch.stack(means)

    expected = chain_statistics(model("propagate"), x)[1].prior_mean
    assert expected is not None
    large, small = draws(x), draws(x[:2])
    spread = large.std(dim=0)
    assert float(((large.mean(dim=0) - expected) / (spread / 8)).abs().max()) < 4.0  # within 4 standard errors
    ratio = spread / small.std(dim=0)
    assert 0.6 < float(ratio.min()) and float(ratio.max()) < 1.6, ratio  # (N, C, H, W) draws: about 1/√8 = 0.35


def test_channels_of_a_part_without_normalization_get_prior_weight_zero() -> None:
    """cat([bn1(conv1(x)), conv2(x)]): the second part's channels take batch statistics alone (p = 0)."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(6)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn2(torch.cat([self.bn1(self.conv1(x)), self.conv2(x)], dim=1))

    model = convert_batchnorm(Mixed(), torch.randn(2, 3, 4, 4), prior_weight=0.5)
    layer = chain_statistics(model, torch.randn(3, 3, 4, 4))[1]
    assert layer.transition == "propagate"
    torch.testing.assert_close(layer.prior_weight, torch.tensor([0.5] * 4 + [0.0] * 2))
    assert "channels 4:6 have no normalization upstream" in describe_chain(model)[1].note


def test_a_squeeze_excitation_gate_is_named_as_an_approximation() -> None:
    class SqueezeExcite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1, self.conv, self.bn2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.reduce, self.expand = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.bn1(x))
            gate = torch.sigmoid(self.expand(torch.relu(self.reduce(F.adaptive_avg_pool2d(h, 1)))))
            return self.bn2(self.conv(h * gate))

    model = convert_batchnorm(SqueezeExcite(), torch.randn(2, 4, 6, 6))
    link = describe_chain(model)[1]
    assert link.transition == "propagate"
    assert any(a.startswith("gate(") and "independent" in a for a in link.approximations), link.approximations
