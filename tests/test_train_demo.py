"""Specification of the demo package: its networks, the training loop, ``bkn train-demo``, the [demo] extra."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from torch import nn

from bkn_export.chain.record import record_dataflow
from bkn_export.chain.steps import Affine, Elementwise, Pool
from bkn_export.cli import main
from bkn_export.commands import train_demo
from bkn_export.demo import INSTALL_DEMO, DemoDependencyError
from bkn_export.demo.data import load_digits_split
from bkn_export.demo.models import (
    NETWORKS,
    NORMALIZERS,
    DigitsSiLUPoolNet,
    build_network,
    digits_resnet,
    make_norm,
)
from bkn_export.demo.plots import accuracy_vs_batch_size_png
from bkn_export.demo.training import (
    REFERENCE_BATCH,
    TrainConfig,
    batch_stream,
    evaluate,
    scaled_learning_rate,
    shift_augment,
    train_and_evaluate,
)
from bkn_export.nn import BatchKalmanNorm2d, KalmanOptions

TINY = ["--batch-sizes", "4", "--seeds", "1", "--epochs", "0.05"]


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_digits_split()


# ---------------------------------------------------------------------- the command


@pytest.mark.parametrize("network", NETWORKS)
def test_command_runs_end_to_end_and_writes_json_and_png(
    network: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nested" / "out"
    status = main(["train-demo", *TINY, "--network", network, "--normalizers", "batchnorm,bkn", "--out", str(out)])
    assert status == 0
    report = json.loads((out / train_demo.RESULTS_NAME).read_text())
    assert report["complete"] is True
    assert report["settings"]["network"] == network and network in report["measures"]
    assert report["settings"]["batch_sizes"] == [4]
    assert report["settings"]["normalizers"] == ["batchnorm", "bkn"]
    assert report["environment"]["torch"] == torch.__version__
    assert report["environment"]["cpu"]  # runs are deterministic per machine, not across CPUs: say which made them
    assert report["started"] and report["finished"]
    assert [(r["normalizer"], r["batch_size"], r["seed"]) for r in report["runs"]] == [
        ("batchnorm", 4, 0),
        ("bkn", 4, 0),
    ]
    steps = TrainConfig(batch_size=4, seed=0, epochs=0.05).steps(report["data"]["train"])
    for entry in report["runs"]:
        assert entry["result"]["steps"] == steps
        assert 0.0 <= entry["result"]["test_accuracy"] <= 1.0
        assert entry["result"]["finite"] is True
        name = entry["normalizer"]
        assert report["summary"][name]["4"]["mean"] == entry["result"]["test_accuracy"]
        assert report["summary"][name]["4"]["n"] == 1
    image = matplotlib.image.imread(out / train_demo.PLOT_NAME)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in out.iterdir()) == sorted([train_demo.RESULTS_NAME, train_demo.PLOT_NAME])
    printed = capsys.readouterr().out
    assert str((out / train_demo.RESULTS_NAME).resolve()) in printed.replace("\n", "")
    assert "batchnorm" in printed and "bkn" in printed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--normalizers", "layernorm"], "unknown normalizer 'layernorm'"),
        (["--batch-sizes", "0"], "batch size 0 must be a positive integer"),
        (["--batch-sizes", "2,two"], "batch size 'two' is not an integer"),
        (["--seeds", "0"], "'0' must be > 0"),
        (["--epochs", "-1"], "'-1' must be > 0"),
        (["--network", "resnet50"], "invalid choice: 'resnet50'"),
    ],
)
def test_bad_arguments_exit_with_status_2_and_say_why(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["train-demo", *arguments, "--out", str(tmp_path)])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_run_rejects_bad_settings_given_programmatically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    train_demo.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out")])
    args.normalizers = [["batchnorm", "nonorm"]]
    assert train_demo.run(args) == 2
    assert "unknown normalizer 'nonorm'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quick_is_a_subset_and_explicit_options_override_it() -> None:
    parser = argparse.ArgumentParser()
    train_demo.add_arguments(parser)
    quick = train_demo._settings(parser.parse_args(["--quick"]))
    full = train_demo._settings(parser.parse_args([]))
    assert full["batch_sizes"] == [1, 2, 4, 8, 32] and len(full["seeds"]) >= 3
    assert full["normalizers"] == list(NORMALIZERS) and set(quick["normalizers"]) <= set(NORMALIZERS)
    assert set(quick["batch_sizes"]) < set(full["batch_sizes"]) and {2, 32} <= set(quick["batch_sizes"])
    overridden = train_demo._settings(parser.parse_args(["--quick", "--normalizers", "bkn", "--batch-sizes", "8"]))
    assert overridden["normalizers"] == ["bkn"] and overridden["batch_sizes"] == [8]
    assert overridden["seeds"] == quick["seeds"]


# ---------------------------------------------------------------------- the training loop


@pytest.mark.parametrize("norm", ["batchnorm", "bkn-authors"])
def test_training_is_deterministic_given_a_seed(norm: str, digits) -> None:  # type: ignore[no-untyped-def]
    config = TrainConfig(batch_size=8, seed=3, epochs=0.1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = train_and_evaluate(lambda: digits_resnet(norm), digits, config)
    assert torch.equal(torch.get_rng_state(), before), "a run must leave the caller's RNG state alone"
    second = train_and_evaluate(lambda: digits_resnet(norm), digits, config)
    other_seed = train_and_evaluate(lambda: digits_resnet(norm), digits, TrainConfig(8, seed=4, epochs=0.1))
    same = ("test_accuracy", "test_loss", "train_loss", "steps", "samples_seen", "lr")
    assert [getattr(first, k) for k in same] == [getattr(second, k) for k in same]
    assert (first.test_loss, first.train_loss) != (other_seed.test_loss, other_seed.train_loss)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 8, 32])
def test_every_batch_size_sees_the_same_number_of_samples(batch_size: int) -> None:
    config = TrainConfig(batch_size=batch_size, seed=0, epochs=2.0)
    samples = config.steps(1347) * batch_size
    assert 2 * 1347 - batch_size < samples <= 2 * 1347
    assert scaled_learning_rate(0.1, batch_size) == pytest.approx(0.1 * batch_size / REFERENCE_BATCH)


def test_batch_stream_visits_every_sample_once_per_epoch() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = batch_stream(num_samples=12, batch_size=4, steps=6, generator=generator)
    assert all(b.shape == (4,) for b in batches)
    first_epoch, second_epoch = torch.cat(batches[:3]), torch.cat(batches[3:])
    assert sorted(first_epoch.tolist()) == list(range(12)) == sorted(second_epoch.tolist())
    assert not torch.equal(first_epoch, second_epoch)


def test_shift_augment_translates_each_image_and_fills_the_background() -> None:
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5)
    fill = -7.0
    shifted = shift_augment(x, 1, torch.Generator().manual_seed(1), fill)
    assert shifted.shape == x.shape
    for image, result in zip(x, shifted):
        candidates = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                expected = torch.full_like(image, fill)
                h, w = image.shape[1:]
                expected[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
                    :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
                ]
                candidates.append(expected)
        assert any(torch.equal(result, c) for c in candidates)
    assert torch.equal(shift_augment(x, 0, torch.Generator(), fill), x)


def test_evaluation_uses_running_statistics(digits) -> None:  # type: ignore[no-untyped-def]
    model = digits_resnet("batchnorm")
    model.train()
    with torch.no_grad():
        model(digits.x_train[:64])  # move the running statistics away from their initial values
    accuracy_full, loss_full = evaluate(model, digits.x_test, digits.y_test, batch_size=512)
    accuracy_small, loss_small = evaluate(model, digits.x_test, digits.y_test, batch_size=3)
    assert model.training, "evaluate must restore the training flag"
    # With running statistics an example's output does not depend on its batch.
    assert accuracy_full == accuracy_small
    assert loss_full == pytest.approx(loss_small, rel=1e-5)


@pytest.mark.parametrize(
    ("network", "stem_stride"), [("digits_resnet", 1), ("digits_resnet", 2), ("digits_silu_pool", 2)]
)
@pytest.mark.parametrize("norm", NORMALIZERS)
def test_demo_net_trains_at_batch_size_1(network: str, norm: str, stem_stride: int) -> None:
    """Every normalizer of the demo nets sees (1, C, H, W) with H·W ≥ 4; none sees (1, C)."""
    model = build_network(network, norm, stem_stride=stem_stride)
    model.train()
    shapes: list[tuple[int, ...]] = []
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, BatchKalmanNorm2d)
    hooks = [
        m.register_forward_hook(lambda _m, inputs, _o: shapes.append(tuple(inputs[0].shape)))
        for m in model.modules()
        if isinstance(m, norm_types)
    ]
    logits = model(torch.randn(1, 1, 8, 8))
    logits.sum().backward()
    for hook in hooks:
        hook.remove()
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    assert shapes and all(len(s) == 4 and s[0] == 1 and s[2] * s[3] >= 4 for s in shapes)


# ---------------------------------------------------------------------- the networks


def test_silu_pool_net_has_silu_and_pooling_on_every_link_of_its_chain() -> None:
    """norm1 → SiLU → AvgPool → conv → norm2 → SiLU → conv → MaxPool → norm3, as recorded by data flow."""
    chain = record_dataflow(DigitsSiLUPoolNet("batchnorm"), torch.randn(2, 1, 8, 8))
    assert chain.names == ["norm1", "norm2", "norm3"]
    assert [tuple(chain[n].input_shape[2:]) for n in chain.names] == [(8, 8), (4, 4), (2, 2)]

    def steps(name: str) -> list[str]:
        (source,) = chain[name].sources
        described = []
        for step in source.steps:
            if isinstance(step, Elementwise):
                described.append(step.kind)
            elif isinstance(step, Pool):
                described.append(f"{step.spec.kind}_pool")
            elif isinstance(step, Affine):
                described.append(step.kind)
            else:
                described.append(type(step).__name__)
        return [f"{source.normalization}", *described]

    assert steps("norm2") == ["norm1", "silu", "avg_pool", "conv"]
    assert steps("norm3") == ["norm2", "silu", "conv", "max_pool"]


@pytest.mark.parametrize(
    ("kind", "prior_source"),
    [("bkn", KalmanOptions().prior_source), ("bkn-input", "input"), ("bkn-output", "output"),
     ("bkn-authors", "input")],
)  # fmt: skip
def test_bkn_normalizers_fix_the_prior_convention(kind: str, prior_source: str) -> None:
    layer = make_norm(kind, 8)
    assert isinstance(layer, BatchKalmanNorm2d)
    assert layer.options.prior_source == prior_source
    if kind == "bkn-authors":
        assert layer.options == KalmanOptions.authors()


def test_unknown_network_or_normalizer_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown network 'lenet'; choose one of \('digits_resnet'"):
        build_network("lenet")
    with pytest.raises(ValueError, match=r"unknown normalizer 'layernorm'; choose one of \('batchnorm'"):
        make_norm("layernorm", 4)


# ---------------------------------------------------------------------- the [demo] extra


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import <module>`` fail as it does when the distribution is not installed."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_digits_without_scikit_learn_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "sklearn")
    with pytest.raises(DemoDependencyError, match=r"digits data .* needs scikit-learn.*") as raised:
        load_digits_split()
    assert INSTALL_DEMO in str(raised.value) and INSTALL_DEMO == 'pip install -e ".[demo]"'


def test_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "matplotlib")
    with pytest.raises(DemoDependencyError, match=r"plot .* needs matplotlib.*pip install -e \"\.\[demo\]\""):
        accuracy_vs_batch_size_png({"bkn": [(2, 0.9, 0.01)]})


@pytest.mark.parametrize("missing", ["sklearn", "matplotlib"])
def test_train_demo_without_the_extra_exits_2_before_writing_anything(
    missing: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _block(monkeypatch, missing)
    out = tmp_path / "out"
    assert main(["train-demo", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bkn train-demo: DemoDependencyError: ") and len(err.splitlines()) == 1
    assert INSTALL_DEMO in err
    assert not out.exists()


def test_library_and_demo_import_without_the_extra() -> None:
    """Importing the package, the demo modules and ``bkn train-demo --help`` need neither sklearn nor matplotlib."""
    code = """
import sys
sys.modules["sklearn"] = None
sys.modules["matplotlib"] = None
import torch, bkn_export
from bkn_export.demo import data, models, plots, training
from bkn_export.commands import train_demo
model = bkn_export.convert_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                     torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)),
                                     torch.randn(2, 1, 8, 8))
models.digits_silu_pool("bkn-output")(torch.randn(2, 1, 8, 8))
from bkn_export.cli import main
try:
    main(["train-demo", "--help"])
except SystemExit as done:
    assert done.code == 0, done.code
print("imports ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--network" in result.stdout and result.stdout.rstrip().endswith("imports ok")


def test_training_figures_do_not_depend_on_the_thread_count(digits) -> None:  # type: ignore[no-untyped-def]
    """`bkn demo` read 94.7 % with one thread and 93.8 % with two: the loop now runs single-threaded, and gives
    the caller's thread count back."""
    config = TrainConfig(batch_size=2, seed=0, epochs=0.05)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(train_and_evaluate(lambda: digits_resnet("bkn"), digits, config))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    same = ("test_accuracy", "test_loss", "train_loss")
    assert [getattr(results[0], k) for k in same] == [getattr(results[1], k) for k in same]
