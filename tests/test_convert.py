"""Specification of BatchNorm → BKN conversion, chain wiring, chain description and checkpoints.

The ResNet-style model is written here (no torchvision): a stem, an identity block, a
block with a strided projection shortcut, and a BatchNorm after the residual sum.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bkn_export import (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    KalmanOptions,
    convert_batchnorm,
    describe_chain,
    format_chain,
    load_batchnorm_state_dict,
)
from bkn_export.distributed import SyncBatchKalmanNorm
from bkn_export.errors import ChainWiringError, CheckpointError, ConversionError, KalmanOptionsError
from bkn_export.nn import _BatchKalmanNorm

TOL: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus an identity or projection (1x1 conv + bn) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block1 = Block(8, 8, 1)
        self.block2 = Block(8, 16, 2)
        self.post_bn = nn.BatchNorm2d(16)  # after the residual sum: no Conv feeds it
        self.head = nn.Linear(16, 10)
        self.head_bn = nn.BatchNorm1d(10)

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.stem_bn(self.stem(x)))
        out = self.post_bn(self.block2(self.block1(out)))
        return self.head_bn(self.head(out.mean(dim=(2, 3))))


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                c = module.num_features
                assert module.running_mean is not None and module.running_var is not None
                assert module.num_batches_tracked is not None
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator))
                module.running_mean.copy_(torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)
    return model


def _example() -> Tensor:
    return torch.randn(4, 3, 8, 8, dtype=torch.float64)


def _norm_types(model: nn.Module) -> dict[str, type]:
    return {
        n: type(m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._NormBase, _BatchKalmanNorm))
    }


@pytest.mark.parametrize("options", [KalmanOptions(), KalmanOptions.authors()], ids=["default", "authors"])
def test_conversion_keeps_eval_outputs(options: KalmanOptions) -> None:
    bn_model = _trained_like(TinyResNet().double()).eval()
    x = _example()
    expected = bn_model(x)
    converted = convert_batchnorm(bn_model, x, options)
    assert converted is bn_model  # in place
    types = _norm_types(converted)
    assert types["head_bn"] is BatchKalmanNorm1d
    assert all(t is BatchKalmanNorm2d for n, t in types.items() if n != "head_bn")
    assert not converted.training
    torch.testing.assert_close(converted(x), expected, **TOL)


def test_conversion_carries_state_and_training_mode() -> None:
    bn_model = _trained_like(TinyResNet()).train()
    reference = {k: v.clone() for k, v in bn_model.state_dict().items()}
    converted = convert_batchnorm(bn_model, _example().float())
    assert converted.training and all(m.training for m in converted.modules())
    state = converted.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_syncbatchnorm_converts_to_syncbatchkalmannorm() -> None:
    """SyncBatchNorm keeps synchronised statistics: it becomes SyncBatchKalmanNorm, wired, eval outputs kept."""
    bn_model = _trained_like(TinyResNet().double()).eval()
    x = _example()
    expected = bn_model(x)
    plain_chain = describe_chain(convert_batchnorm(copy.deepcopy(bn_model), x))
    sync_model = nn.SyncBatchNorm.convert_sync_batchnorm(bn_model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync_model.modules())
    converted = convert_batchnorm(sync_model, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    norms = [m for m in converted.modules() if isinstance(m, _BatchKalmanNorm)]
    assert norms and all(isinstance(m, SyncBatchKalmanNorm) for m in norms)
    assert describe_chain(converted) == plain_chain
    torch.testing.assert_close(converted(x), expected, **TOL)  # eval mode needs no process group


def test_batchnorm_checkpoint_loads_into_converted_model() -> None:
    """load_batchnorm_state_dict(converted, bn_state): BN keys load, BKN-only keys keep their initial values."""
    trained = _trained_like(TinyResNet().double(), seed=5).eval()
    x = _example()
    expected = trained(x)
    converted = convert_batchnorm(TinyResNet().double(), x)
    initial = {k: v.clone() for k, v in converted.state_dict().items() if k.endswith("_raw") or k.endswith("_logit")}
    left = load_batchnorm_state_dict(converted, trained.state_dict())
    assert set(initial) <= set(left) and all(k.endswith(("_logit", "_raw", "_matrix", "_extra_state")) for k in left)
    state = converted.state_dict()
    for key, value in initial.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    torch.testing.assert_close(converted.eval()(x), expected, **TOL)


def test_a_bkn_checkpoint_given_to_the_batchnorm_loader_is_named_as_one() -> None:
    """load_batchnorm_state_dict used to compare the wirings' JSON lengths ("other shapes: bn0._extra_state (410,)")."""
    x = _example().float()
    saved = convert_batchnorm(TinyResNet(), x).state_dict()
    with pytest.raises(CheckpointError, match=r"saved from a BKN model .*load it with model.load_state_dict"):
        load_batchnorm_state_dict(convert_batchnorm(TinyResNet(), x), saved)


def test_a_checkpoint_of_another_wiring_is_refused_before_any_tensor_loads() -> None:
    """The wiring check of the layer that differs ran as that layer loaded, after the tensors of every module
    before it: a refused checkpoint left the model half overwritten. The wired root checks every layer's first."""
    x = _example().float()
    torch.manual_seed(0)
    saved = convert_batchnorm(TinyResNet(), x, prior_source="input").state_dict()
    saved = {k: v + 1.0 if v.is_floating_point() else v for k, v in saved.items()}
    torch.manual_seed(1)
    target = convert_batchnorm(TinyResNet(), x)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ChainWiringError, match="wiring differs in prior_source"):
        target.load_state_dict(saved)
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded


def test_batchnorm_checkpoint_of_another_architecture_is_refused() -> None:
    converted = convert_batchnorm(TinyResNet(), _example().float())
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(CheckpointError, match=r"\d+ unexpected key\(s\)"):
        load_batchnorm_state_dict(converted, other.state_dict())


@pytest.mark.parametrize("fault", ["another width", "an extra key"])
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_loads(fault: str) -> None:
    x = _example().float()
    converted = convert_batchnorm(TinyResNet(), x).eval()
    before = {k: v.clone() for k, v in converted.state_dict().items() if isinstance(v, torch.Tensor)}
    checkpoint = {k: torch.full_like(v, 7.0) for k, v in TinyResNet().state_dict().items()}
    if fault == "another width":
        key = next(k for k, v in checkpoint.items() if k.endswith("weight") and v.dim() == 4)
        checkpoint[key] = torch.zeros(checkpoint[key].shape[0] + 1, *checkpoint[key].shape[1:])
        match = f"other shapes: {key}"
    else:
        checkpoint["junk.weight"] = torch.zeros(1)
        match = r"1 unexpected key\(s\) \(junk.weight\)"
    with pytest.raises(CheckpointError, match=match):
        load_batchnorm_state_dict(converted, checkpoint)
    after = converted.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded


@pytest.mark.parametrize("metadata_version", [None, 1])
def test_a_batchnorm_checkpoint_from_before_num_batches_tracked_loads_as_batchnorm_loads_it(
    metadata_version: int | None,
) -> None:
    """Old model-zoo weights have no ``num_batches_tracked`` (PyTorch < 0.4.1): nn.BatchNorm fills in its own
    count, and so does load_batchnorm_state_dict; every other entry loads."""
    trained = _trained_like(TinyResNet().double(), seed=6).eval()
    x = _example()
    old = OrderedDict((k, v) for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked"))
    if metadata_version is not None:
        old._metadata = {k: {"version": metadata_version} for k in trained.state_dict()._metadata}  # type: ignore[attr-defined]
    plain = TinyResNet().double()
    plain.load_state_dict(old)  # what BatchNorm does with it: strict, and it loads
    converted = convert_batchnorm(TinyResNet().double(), x)
    counts = {k: v.clone() for k, v in converted.state_dict().items() if k.endswith("num_batches_tracked")}
    left = load_batchnorm_state_dict(converted, old)
    assert counts and set(counts) <= set(left)
    state = converted.state_dict()
    assert all(torch.equal(state[k], v) for k, v in counts.items())  # the model's own count, as BatchNorm keeps
    torch.testing.assert_close(converted.eval()(x), trained(x), **TOL)


def test_a_checkpoint_without_num_batches_tracked_at_version_2_is_refused_as_batchnorm_refuses_it() -> None:
    state = TinyResNet().state_dict()
    key = next(k for k in state if k.endswith("num_batches_tracked"))
    del state[key]
    with pytest.raises(RuntimeError, match="Missing key"):
        TinyResNet().load_state_dict(state)
    converted = convert_batchnorm(TinyResNet(), _example().float())
    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\) \({key}\)"):
        load_batchnorm_state_dict(converted, state)


def test_a_checkpoint_saved_from_a_dataparallel_wrapper_names_the_prefix() -> None:
    converted = convert_batchnorm(TinyResNet(), _example().float())
    wrapped = {f"module.{k}": v for k, v in TinyResNet().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"start with 'module\.'.*consume_prefix_in_state_dict_if_present"):
        load_batchnorm_state_dict(converted, wrapped)


def test_converted_checkpoint_round_trips(tmp_path: object) -> None:
    """state_dict → torch.save → torch.load → strict load into a fresh conversion: same outputs, train and eval."""
    x = _example()
    model = convert_batchnorm(_trained_like(TinyResNet().double()), x)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # move every parameter, BKN ones included, off its initial value
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = convert_batchnorm(TinyResNet().double(), x)
    fresh.load_state_dict(torch.load(buffer), strict=True)
    model.train()
    fresh.train()
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-12, atol=1e-12)
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def _plain_chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    )


def test_checkpoint_with_other_wiring_raises_chain_wiring_error() -> None:
    x = torch.randn(2, 3, 6, 6)
    saved = convert_batchnorm(_plain_chain(), x, transition="propagate").state_dict()
    other = convert_batchnorm(_plain_chain(), x, transition="identity")
    assert set(other.state_dict()) == set(saved)  # same keys: only the wiring differs
    with pytest.raises(
        ChainWiringError, match=r"BatchKalmanNorm2d '4'.*saved with wiring.*propagate.*identity.*convert_batchnorm"
    ):
        other.load_state_dict(saved, strict=True)


def test_model_without_batchnorm_converts_to_itself_with_a_warning() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="Sequential has no BatchNorm"):
        converted = convert_batchnorm(model, torch.randn(1, 3, 5, 5))
    assert converted is model
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_layer_that_did_not_run_is_converted_unwired_with_a_warning() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _plain_chain()
            self.unused = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    model = WithSpare()
    with pytest.warns(UserWarning, match="'unused' did not run"):
        convert_batchnorm(model, torch.randn(2, 3, 6, 6))
    assert isinstance(model.unused, BatchKalmanNorm2d) and not model.unused.has_predecessor


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(KalmanOptionsError, match=r"unknown BKN options \['gain'\]"):
        convert_batchnorm(_plain_chain(), torch.randn(2, 3, 6, 6), gain=0.5)


def test_describe_chain_on_residual_model() -> None:
    """Each layer's sources by data flow, in execution order: residual sums and the steps after them."""
    model = convert_batchnorm(TinyResNet(), _example().float())
    links = {link.name: link for link in describe_chain(model)}
    assert list(links) == [
        "stem_bn",
        "block1.bn1",
        "block1.bn2",
        "block2.bn1",
        "block2.bn2",
        "block2.shortcut.1",
        "post_bn",
        "head_bn",
    ]
    assert links["stem_bn"].predecessor is None and links["stem_bn"].transition is None
    assert "no normalization upstream" in links["stem_bn"].note
    block_input = "sum('block1.bn2' + 'stem_bn' → relu()) → relu()"
    expected = {  # name: the source paths in words
        "block1.bn1": ("'stem_bn' → relu() → conv 'block1.conv1'",),
        "block1.bn2": ("'block1.bn1' → relu() → conv 'block1.conv2'",),
        # the second block reads the first block's output: the sum of its branch and its identity shortcut
        "block2.bn1": (f"{block_input} → conv 'block2.conv1'",),
        "block2.bn2": ("'block2.bn1' → relu() → conv 'block2.conv2'",),
        "block2.shortcut.1": (f"{block_input} → conv 'block2.shortcut.0'",),
        # after the residual sum: both addends, then the ReLU
        "post_bn": ("sum('block2.bn2' + 'block2.shortcut.1') → relu()",),
        "head_bn": ("'post_bn' → adaptive_avg_pool2d(output (1, 1)) → reshape(N, C) → linear 'head'",),
    }
    for name, sources in expected.items():
        assert (links[name].transition, links[name].sources) == ("propagate", sources), name
    # the one-predecessor view where a single path comes from one normalization
    assert (links["block1.bn2"].predecessor, links["block1.bn2"].feeding_layer, links["block1.bn2"].rectify) == (
        "block1.bn1",
        "block1.conv2",
        True,
    )
    assert links["head_bn"].approximations == ()  # global average pooling and Linear are exact

    table = format_chain(model).splitlines()
    assert table[0].split() == ["layer", "transition", "sources", "notes"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "batchnorm (first in chain)" in rows["stem_bn"]
    assert "sum('block2.bn2' + 'block2.shortcut.1') → relu()" in rows["post_bn"]


def test_concatenation_is_predicted_part_by_part_without_a_learned_matrix() -> None:
    """A layer fed by torch.cat([out, out]) gets the concatenation of both parts' predictions."""

    class Widen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(8)

        def forward(self, x: Tensor) -> Tensor:
            out = self.bn1(self.conv(x))
            return self.bn2(torch.cat([out, out], dim=1))

    model = convert_batchnorm(Widen(), torch.randn(2, 3, 4, 4))
    link = describe_chain(model)[1]
    assert (link.predecessor, link.transition, link.combine) == ("bn1", "propagate", "concat")
    assert link.sources == ("'bn1'", "'bn1'")
    assert not any(name.endswith("transition_matrix") for name, _ in model.named_parameters())
    learned = convert_batchnorm(Widen(), torch.randn(2, 3, 4, 4), transition="learned")
    assert learned.get_parameter("bn2.transition_matrix").shape == (8, 4)  # C_k x C of the one source


def test_conversion_under_warnings_as_errors_for_a_clean_model() -> None:
    """A model whose BatchNorms all run converts without any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_batchnorm(TinyResNet(), _example().float())


@pytest.mark.parametrize("n", [2, 8])
def test_readme_sampled_variance_is_low_by_n_minus_one_over_n_for_a_linear_feed(n: int) -> None:
    """README (transitions, departures): ``propagate``'s mean is the expectation of ``sampled``'s, its variance not.

    For a Linear feed the N rows of a micro-batch are independent draws, so the expected biased
    sample variance is (N−1)/N of the pushed-through variance W² v. The ``sampled`` transition's
    ops (the path's Linear step on a reparameterised draw, then batch statistics) are
    checked on one micro-batch against the direct formula, which then runs on 20 000 float64
    micro-batches at once: the ratio's Monte Carlo standard error is ≤ 0.01, the bound ±0.04.
    """
    from bkn_export import functional as Fk
    from bkn_export.chain.steps import Affine

    generator = torch.Generator().manual_seed(3)
    layer = nn.Linear(6, 5).double()
    mean = torch.randn(6, generator=generator, dtype=torch.float64)
    variance = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5
    weight, bias = layer.weight.detach(), layer.bias.detach()

    def direct(noise: Tensor) -> tuple[Tensor, Tensor]:  # noise (..., N, 6) -> per micro-batch (..., 5) twice
        out = (mean + variance.sqrt() * noise) @ weight.T + bias
        return out.mean(dim=-2), out.var(dim=-2, correction=0)

    noise = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    drawn = Affine("fc", "linear").apply(mean + variance.sqrt() * noise, {"fc": layer})
    library = tuple(Fk.batch_statistics(drawn))[:2]
    torch.testing.assert_close(library, direct(noise), rtol=1e-12, atol=1e-12)

    sampled_mean, sampled_variance = direct(torch.randn(20_000, n, 6, generator=generator, dtype=torch.float64))
    torch.testing.assert_close(sampled_mean.mean(0), weight @ mean + bias, rtol=0, atol=0.03)
    ratio = sampled_variance.mean(0) / ((weight * weight) @ variance)
    torch.testing.assert_close(ratio, torch.full_like(ratio, (n - 1) / n), rtol=0, atol=0.04)


# ----------------------------------------------------------------- what the converted layer takes over


def _conv_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_converted_layers_take_over_the_batchnorms_parameter_and_buffer_objects() -> None:
    """A frozen BatchNorm stays frozen, and an optimizer built before conversion still trains the new layers."""
    model = _conv_bn_net()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    originals = {
        (index, attribute): getattr(model[index], attribute)
        for index in (1, 4)
        for attribute in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert isinstance(model[1], BatchKalmanNorm2d) and isinstance(model[4], BatchKalmanNorm2d)
    for (index, attribute), tensor in originals.items():
        assert getattr(model[index], attribute) is tensor, (index, attribute)
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[4].weight.requires_grad
    trained_before = model[4].weight.detach().clone()
    frozen_before = model[1].weight.detach().clone()
    model.train()
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model[4].weight.detach(), trained_before)  # the optimizer holds the converted layer's
    assert torch.equal(model[1].weight.detach(), frozen_before) and model[1].weight.grad is None


class _Softplus(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return nn.functional.softplus(w)


def test_a_parametrized_weight_keeps_its_constraint() -> None:
    """torch.nn.utils.parametrize on a BatchNorm weight: the converted layer computes its weight the same way."""
    from torch.nn.utils import parametrize

    model = _conv_bn_net()
    parametrize.register_parametrization(model[1], "weight", _Softplus())
    unconstrained = model[1].parametrizations.weight.original
    keys = set(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # true here: a parametrized layer is no source (its output through the parametrization cannot carry moments)
        warnings.filterwarnings("ignore", message="none of the 2 BKN layers has a Kalman prior")
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    layer = model[1]
    assert isinstance(layer, BatchKalmanNorm2d) and parametrize.is_parametrized(layer, "weight")
    assert layer.parametrizations.weight.original is unconstrained
    with torch.no_grad():
        unconstrained.fill_(-3.0)  # the constraint is live: softplus(-3) > 0
        torch.testing.assert_close(layer.weight, nn.functional.softplus(torch.full((4,), -3.0)))
    assert {k for k in model.state_dict() if not k.endswith("_extra_state")} >= keys


@pytest.mark.filterwarnings("ignore:forward hooks on modules the Kalman chain")
def test_forward_hooks_and_pre_hooks_carry_over_and_their_handles_still_remove_them() -> None:
    model = _conv_bn_net()
    calls: list[str] = []
    model[1].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model[1].register_forward_pre_hook(lambda module, args, kwargs: calls.append("pre-kwargs"), with_kwargs=True)
    handle = model[1].register_forward_hook(lambda module, args, output: calls.append("post"), always_call=True)
    convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert isinstance(model[1], BatchKalmanNorm2d)
    calls.clear()
    model(torch.randn(2, 3, 8, 8))
    assert calls == ["pre", "pre-kwargs", "post"]
    handle.remove()
    calls.clear()
    model(torch.randn(2, 3, 8, 8))
    assert calls == ["pre", "pre-kwargs"]


@pytest.mark.filterwarnings("ignore:forward hooks on modules the Kalman chain")
def test_a_refused_conversion_leaves_the_batchnorms_parameters_and_hooks_alone() -> None:
    class Doubling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _conv_bn_net()

        def forward(self, x: Tensor) -> Tensor:
            out = self.body(x)
            return out * 2 if isinstance(self.body[4], nn.BatchNorm2d) else out

    model = Doubling()
    bn = model.body[1]
    bn.weight.requires_grad_(False)
    weight, calls = bn.weight, []
    bn.register_forward_hook(lambda module, args, output: calls.append(1))
    with pytest.raises(ConversionError, match="eval-mode outputs"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert model.body[1] is bn and type(bn) is nn.BatchNorm2d and bn.weight is weight and not weight.requires_grad
    calls.clear()
    model(torch.randn(2, 3, 8, 8))
    assert calls == [1]


def test_bkn_layers_are_not_batchnorm_instances_but_share_a_public_base() -> None:
    """Code that finds BatchNorms by isinstance must also test bkn_export.BatchKalmanNormBase (README)."""
    import bkn_export

    model = convert_batchnorm(_conv_bn_net(), torch.randn(2, 3, 8, 8))
    assert not isinstance(model[1], nn.modules.batchnorm._BatchNorm)
    assert bkn_export.BatchKalmanNormBase is _BatchKalmanNorm
    assert isinstance(model[1], bkn_export.BatchKalmanNormBase)


def test_hooks_on_a_syncbatchnorm_carry_over_to_its_synchronised_bkn_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)).eval()
    calls: list[int] = []
    model[1].register_forward_hook(lambda module, args, output: calls.append(1))
    convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert isinstance(model[1], SyncBatchKalmanNorm)
    calls.clear()
    model(torch.randn(2, 3, 8, 8))
    assert calls == [1]


def test_state_dict_hooks_are_not_carried_over_and_the_warning_names_the_module() -> None:
    model = _conv_bn_net()
    model[4].register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)
    with pytest.warns(UserWarning, match=r"'4' \(BatchNorm2d\) has state_dict_pre_hooks registered"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))


class _ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _Holder(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block


class _SharedBlock(nn.Module):
    """A block that a second container also holds (never called through it), as MONAI's DynUNet holds its input
    block again in ``skip_layers``: ``named_modules()`` lists the BatchNorm once, as ``block.bn``."""

    def __init__(self, doubles_while_batchnorm: bool = False) -> None:
        super().__init__()
        self.block = _ConvBnRelu()
        self.holder = _Holder(self.block)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.doubles_while_batchnorm = doubles_while_batchnorm

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.block(x)))
        if self.doubles_while_batchnorm and isinstance(self.block.bn, nn.BatchNorm2d):
            out = out * 2
        return out


def test_a_block_held_under_two_names_is_converted_once_and_stays_shared() -> None:
    """Both names reach the one converted layer, the block stays one object, and the chain is wired through it.
    (The working copy used to share the second holder with the original model, so its BatchNorm came out as a
    second, unknown one: a KeyError from inside the conversion.)"""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = _trained_like(_SharedBlock().double()).eval()
    expected = model(x)
    convert_batchnorm(model, x)
    assert model.holder.block is model.block and isinstance(model.block.bn, BatchKalmanNorm2d)
    assert model.bn2.has_predecessor
    assert not any(isinstance(m, nn.BatchNorm2d) for _, m in model.named_modules(remove_duplicate=False))
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-12, atol=1e-12)
    fresh = convert_batchnorm(_SharedBlock().double(), x)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.train(), fresh.train()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_refused_conversion_of_a_shared_block_leaves_both_names_on_the_batchnorm() -> None:
    model = _SharedBlock(doubles_while_batchnorm=True).eval()
    block, bn = model.block, model.block.bn
    with pytest.raises(ConversionError, match="eval-mode outputs"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert model.block is block and model.holder.block is block and block.bn is bn and type(bn) is nn.BatchNorm2d


def test_a_batchnorm_registered_under_two_names_becomes_one_layer_under_both() -> None:
    """Called through its second name (once through each), the BatchNorm used to stay a BatchNorm there; the
    wiring then refused it with a message telling the user to convert what they were converting."""

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.norm = self.bn

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(self.conv2(torch.relu(self.bn(self.conv(x)))))

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = _trained_like(Aliased().double()).eval()
    expected = model(x)
    convert_batchnorm(model, x)
    assert model.norm is model.bn and isinstance(model.bn, BatchKalmanNorm2d)
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-12, atol=1e-12)
    model.train()(x).sum().backward()
    assert model.bn.weight.grad is not None


def test_converting_a_converted_model_warns_that_its_learned_bkn_parameters_start_again() -> None:
    x = torch.randn(2, 3, 6, 6)
    model = convert_batchnorm(_plain_chain(), x)
    with pytest.warns(UserWarning, match=r"'4' \(prior_weight_logit, process_noise_raw\).*initial values"):
        convert_batchnorm(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_batchnorm(_plain_chain(), x)  # a first conversion: no such warning


def test_a_batchnorm_with_eps_zero_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0)).eval()
    with pytest.raises(ConversionError, match=r"'1' \(BatchNorm2d\) has eps=0.0.*set its eps > 0"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert type(model[1]) is nn.BatchNorm2d


def test_a_model_converted_under_inference_mode_trains() -> None:
    """The new BKN parameters were inference tensors: the first backward failed far from the conversion."""
    x = torch.randn(4, 5)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6)).eval()
    with torch.inference_mode():
        convert_batchnorm(model, x)
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    model.train()(x).sum().backward()
    assert model[4].prior_weight_logit.grad is not None


def test_warnings_point_at_the_callers_line() -> None:
    with pytest.warns(UserWarning, match="has no BatchNorm") as record:
        convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 5, 5))
    assert record[0].filename == __file__


def test_a_batchnorm_whose_affine_was_set_to_none_converts_without_one() -> None:
    """BatchNorm2d(affine=True) with weight and bias set to None normalizes without an affine; it gained a trainable
    γ = 1, β = 0 (new state-dict keys, parameters the model never had) and its own checkpoint no longer loaded."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
    )
    model[4].weight = None
    model[4].bias = None
    saved = copy.deepcopy(model.state_dict())
    original = copy.deepcopy(model).eval()
    x = torch.randn(4, 3, 8, 8)
    convert_batchnorm(model.eval(), x)
    layer = model[4]
    assert isinstance(layer, _BatchKalmanNorm) and not layer.affine and layer.weight is None and layer.bias is None
    assert not any(key.startswith("4.weight") or key.startswith("4.bias") for key in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=1e-6)
    load_batchnorm_state_dict(model, saved)
    model.train()
    model(x).sum().backward()  # a train step runs; only the BKN parameters are new


def test_a_batchnorm_with_one_of_its_affine_tensors_set_to_none_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    model[1].weight = None
    with pytest.raises(ConversionError, match=r"'1' \(BatchNorm2d\) has affine=True but its weight set to None"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))


def test_a_torchscript_module_and_an_uninitialised_lazy_batchnorm_are_refused_by_name() -> None:
    """A scripted model was returned unchanged, "without BatchNorm"; an uninitialised LazyBatchNorm2d alone was left
    a BatchNorm the same way, and beside a BatchNorm2d it raised a bare KeyError after the guard's forward had
    materialised it. Each is now bad input naming what to do, and the model is left as it was."""
    from bkn_export.errors import BKNInputError

    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)))
    with pytest.raises(BKNInputError, match="not a TorchScript module"):
        convert_batchnorm(scripted, torch.randn(2, 3, 8, 8))
    lazy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LazyBatchNorm2d(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(BKNInputError, match=r"'1': uninitialised lazy BatchNorm"):
        convert_batchnorm(lazy, torch.randn(2, 3, 8, 8))
    assert isinstance(lazy[1], nn.modules.batchnorm._LazyNormBase)  # not materialised by a refused conversion
    lazy(torch.randn(2, 3, 8, 8))  # the documented remedy: one forward, then it converts
    convert_batchnorm(lazy, torch.randn(2, 3, 8, 8))
    assert isinstance(lazy[1], BatchKalmanNorm2d)


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_a_batchnorm_with_one_running_statistic_is_refused_by_name(missing: str) -> None:
    """QA of 2026-12-07 (third session): a BatchNorm whose running_mean alone was set to None gave PyTorch's bare
    "running_mean must be defined in evaluation mode" from the model's own forward, naming no layer. It is refused
    before any forward, naming the layer, the buffer and the two remedies; the model is left as it was."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    setattr(model[1], missing, None)
    with pytest.raises(ConversionError, match=rf"'1' \({missing} is None\): a BatchNorm with one running statistic"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert type(model[1]) is nn.BatchNorm2d


class _DirectBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that subclasses ``_BatchNorm`` itself (as some repositories' own BatchNorm2d do)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError("expected 4D input")


class _DirectBatchNorm2d(nn.BatchNorm2d):
    """The remedy the refusal names: the same layer as a BatchNorm2d subclass."""


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside a BatchNorm2d"])
def test_a_direct_batchnorm_subclass_is_refused_by_name(beside: bool) -> None:
    """A subclass of ``_BatchNorm`` that is no BatchNorm1d/2d/3d was left unconverted: alone, with the warning that
    the model has no BatchNorm; beside a BatchNorm2d, with the chain's "convert it with convert_batchnorm first".
    It is now refused by name before anything changes; as a BatchNorm2d subclass the same layer converts."""
    last: nn.Module = nn.BatchNorm2d(4) if beside else _DirectBatchNorm(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _DirectBatchNorm(8), nn.ReLU(), nn.Conv2d(8, 4, 1), last)
    names = r"'1'" if beside else r"'1', '4'"
    with pytest.raises(ConversionError, match=names + r": .*_DirectBatchNorm subclasses torch\.nn\.modules\.batchnorm"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert isinstance(model[1], _DirectBatchNorm) and isinstance(model[4], type(last))  # left as it was
    for index in (1, 4):
        if isinstance(model[index], _DirectBatchNorm):
            model[index] = _DirectBatchNorm2d(model[index].num_features)
    converted = convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert isinstance(converted[1], BatchKalmanNorm2d) and isinstance(converted[4], BatchKalmanNorm2d)


def test_a_quantized_batchnorm_is_refused_as_quantized() -> None:
    """torch.ao's quantized BatchNorm2d subclasses _BatchNorm directly; the advice to subclass nn.BatchNorm2d does
    not apply to a torch class: it is named as quantized, with what to do."""
    quantized = torch.ao.nn.quantized.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    model.add_module("extra", quantized)  # registered, never called
    with pytest.raises(ConversionError, match=r"'extra': a quantized BatchNorm.*convert it before quantizing"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))


class _GatedLinearUnits(nn.Module):
    """``bn2(fc2(a · σ(b)))`` with ``a, b = bn1(fc1 x).chunk(2)``: TabNet's gated unit, which the chain cannot carry."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1, self.fc2, self.bn2 = (
            nn.Linear(4, 16),
            nn.BatchNorm1d(16),
            nn.Linear(8, 16),
            nn.BatchNorm1d(16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.bn1(self.fc1(x)).chunk(2, dim=1)
        return self.bn2(self.fc2(a * torch.sigmoid(b)))  # type: ignore[no-any-return]


def test_a_network_where_no_layer_gets_a_prior_says_it_trains_as_batchnorm() -> None:
    """A cold QA: on pytorch-tabnet's TabNet (21 layers) and pytorchcv's Jasper every layer was first in its chain, so
    the converted network trained exactly as with BatchNorm, and only format_chain said why. Conversion now warns;
    a network whose layers have a prior does not."""
    with pytest.warns(UserWarning, match=r"none of the 2 BKN layers has a Kalman prior.*'bn2'.*exactly as with Batch"):
        convert_batchnorm(_GatedLinearUnits(), torch.randn(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_batchnorm(_conv_bn_net(), torch.randn(2, 3, 8, 8))


class _ScriptedHolder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha


class _ReadsAScriptedAttribute(nn.Module):
    """``bn2(bn1(conv x) · s.alpha)``, ``s`` a TorchScript module whose parameter the Python forward reads; or
    ``bn2(s(h) if hasattr(s, "alpha") else relu(h))``."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.s = torch.jit.script(_ScriptedHolder())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv(x))
        if self.branch:
            return self.bn2(self.s(h) if hasattr(self.s, "alpha") else torch.relu(h))  # type: ignore[no-any-return]
        return self.bn2(h * self.s.alpha)  # type: ignore[no-any-return]


@pytest.mark.parametrize("branch", [False, True])
def test_a_forward_reading_a_torchscript_submodules_attributes_records_what_it_runs(branch: bool) -> None:
    """Reviews: the recorder's wrapper around a TorchScript submodule had none of its attributes, so reading one
    failed with an error blaming the example inputs, and ``hasattr`` took the other branch (a chain through a ReLU
    the model never runs, no note). The wrapper now hands them on; a factor held inside TorchScript is no
    ParameterScale (its name while recording is the wrapper's: the first train step crashed), so the layer after it
    starts its chain, saying why, and the model trains."""
    torch.manual_seed(0)
    model = convert_batchnorm(_ReadsAScriptedAttribute(branch), torch.randn(2, 3, 8, 8))
    (row,) = [line for line in format_chain(model).splitlines() if line.startswith("bn2")]
    assert "first in chain" in row and ("'s' (TorchScript" in row if branch else "Tensor.mul" in row), row
    model.train()(torch.randn(2, 3, 8, 8)).sum().backward()


def test_a_batchnorm_whose_forward_is_replaced_on_the_instance_is_refused_naming_that() -> None:
    """``bn.forward = lambda x: orig(x) * 2 + 1``: the guard refused (right) but advised an adapter, which is for
    subclasses (a cold QA, fifth session of 2026-12-07); and in train mode its copies called the original through
    the closure, so the refused conversion had updated the model's running statistics (the review after). The
    refusal now comes before any forward and names the instance's forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    bn = model[1]
    original = bn.forward
    bn.forward = lambda x: original(x) * 2 + 1
    before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    with pytest.raises(ConversionError, match=r"'1' \(BatchNorm2d\) cannot be converted. Its forward is replaced on"):
        convert_batchnorm(model, torch.randn(2, 3, 6, 6))
    assert type(model[1]) is nn.BatchNorm2d  # left unchanged, its statistics too
    assert all(torch.equal(a, b) for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
