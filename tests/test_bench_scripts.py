"""The speed benchmarks' own logic (not their timings, which live in benchmarks/RESULTS.md): what the
``--unwired`` variant of ``bench_networks.py`` steps, ``bench_op_passes.py``'s table and input errors, and what
``bench_host_overhead.py`` runs, and ``bench_cold_dispatch.py``'s figures and input errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from bkn_export import BatchKalmanNorm1d, BatchKalmanNorm2d, native
from bkn_export.chain.wire import wire_chain

bench_networks = pytest.importorskip("benchmarks.bench_networks")
bench_op_passes = pytest.importorskip("benchmarks.bench_op_passes")


def _wired() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), BatchKalmanNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
        BatchKalmanNorm2d(5),
    )  # fmt: skip
    return wire_chain(model, torch.randn(2, 3, 6, 6))


def test_the_unwired_variant_has_no_chain_and_steps_as_batchnorm() -> None:
    """``--unwired``: every layer's chain membership removed on a copy (the timed network keeps its own), and its
    train step is the unwired layers' BatchNorm step: outputs and running statistics as nn.BatchNorm2d's."""
    torch.manual_seed(0)
    wired = _wired()
    unwired = bench_networks._unwire(copy.deepcopy(wired))
    assert all(getattr(m, "chain", None) is not None for m in wired.modules() if isinstance(m, BatchKalmanNorm2d))
    assert all(m.chain is None for m in unwired.modules() if isinstance(m, BatchKalmanNorm2d))
    reference = nn.Sequential(
        copy.deepcopy(wired[0]), nn.BatchNorm2d(4), nn.ReLU(), copy.deepcopy(wired[3]), nn.BatchNorm2d(5)
    ).train()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(unwired.train()(x), reference(x), rtol=1e-6, atol=1e-6)
    for mine, theirs in ((unwired[1], reference[1]), (unwired[4], reference[4])):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")
def test_op_passes_prints_a_row_per_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_op_passes.main(["--shapes", "2x3x5x5", "3x4x9", "--repeats", "1", "--calls", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split(")")[0] + ")" for row in rows] == ["(2, 3, 5, 5)", "(3, 4, 9)"]
    errors = [float(row.split()[-5]) for row in rows]  # the kernel's relative error: within half an ulp
    assert all(error <= 2.0**-24 for error in errors)


@pytest.mark.parametrize("shape", ["2x0x3", "7", "2xAx3", "-2x3"])
def test_op_passes_refuses_a_bad_shape_with_exit_code_2(shape: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_op_passes.main([f"--shapes={shape}"]) == 2
    assert f"bad shape '{shape}'" in capsys.readouterr().err


def test_host_overhead_skips_every_launch_and_counts_the_layer_steps(tmp_path: Path) -> None:
    """``bench_host_overhead.py`` runs the CUDA route under Triton's interpreter with every launch skipped: a wired
    layer's eager step (``triton_step`` and the one-launch update) issues 3 launches, the contract op's 2 (its
    update is PyTorch's), BatchNorm none; each timed sample is recorded."""
    pytest.importorskip("triton", reason="the CUDA route needs the triton package")
    out = tmp_path / "host.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host_overhead.py"
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["launches"] == {"bkn": 3, "op": 2, "bn": 0}
    assert all(len(values) == 2 and min(values) > 0 for values in record["samples_us"].values())
    assert "launches skipped" in done.stdout


bench_running_statistics = pytest.importorskip("benchmarks.bench_running_statistics")


def test_running_statistics_gap_is_one_where_the_running_statistics_are_the_deployed_ones() -> None:
    """``bench_running_statistics.py`` measures each layer's deployed input (eval mode, pre-hooks) over the test
    set in float64: a layer whose running statistics are set to exactly those reads ratio 1 and mean error 0,
    halving its running variance reads 0.5; the train-mode accuracy probe leaves the model's statistics alone."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), BatchKalmanNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), BatchKalmanNorm2d(4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    model = wire_chain(model, torch.randn(2, 1, 8, 8))
    x = torch.randn(50, 1, 8, 8) * 3 + 1
    model.eval()
    first = model[0](x).double()
    expected_mean, expected_variance = first.mean((0, 2, 3)), first.var((0, 2, 3), unbiased=False)
    deployed = bench_running_statistics.deployed_input_statistics(model, x, batch=16)  # four chunks, one short
    assert set(deployed) == {"1", "4"}
    torch.testing.assert_close(deployed["1"][0], expected_mean)
    torch.testing.assert_close(deployed["1"][1], expected_variance)
    for name in ("1", "4"):
        model[int(name)].running_mean.copy_(deployed[name][0])
        model[int(name)].running_var.copy_(deployed[name][1])
    gaps = bench_running_statistics.layer_gaps(model, deployed)
    for name in ("1", "4"):
        assert gaps[name]["variance_ratio"] == pytest.approx(1.0, rel=1e-6)
        assert gaps[name]["mean_error"] == pytest.approx(0.0, abs=1e-6)
    model[4].running_var.mul_(0.5)
    assert bench_running_statistics.layer_gaps(model, deployed)["4"]["variance_ratio"] == pytest.approx(0.5, rel=1e-6)
    before = [t.clone() for t in (model[4].running_mean, model[4].running_var)]
    data = bench_running_statistics.DigitsSplit(x, x, x[:8], torch.zeros(8, dtype=torch.long))
    assert 0.0 <= bench_running_statistics.train_mode_accuracy(model, data, 2) <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, (model[4].running_mean, model[4].running_var)))


bench_segmentation = pytest.importorskip("benchmarks.bench_microbatch_segmentation")


def test_the_segmentation_benchmark_starts_every_variant_of_a_seed_from_the_same_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench_microbatch_segmentation.py``: its data are a function of the seed, every normalization of a seed starts
    from the BatchNorm network's convolution weights, and a tiny grid runs end to end (every Dice in [0, 1])."""
    pytest.importorskip("monai")
    first, again = (bench_segmentation.synthetic_segmentation(3, 16, seed=5) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert set(first[1].unique().tolist()) <= {0.0, 1.0}
    convs = {
        norm: [m.weight for m in bench_segmentation.make_variant("basicunet", norm, 0, 16)[0].modules()
               if isinstance(m, nn.Conv2d)]
        for norm in bench_segmentation.NORMS
    }  # fmt: skip
    assert all(torch.equal(a, b) for norm in ("bkn", "groupnorm") for a, b in zip(convs["batchnorm"], convs[norm]))
    out = tmp_path / "seg.json"
    argv = ["--steps", "2", "--size", "16", "--train-size", "8", "--test-size", "4", "--batches", "2", "--seeds", "0"]
    assert bench_segmentation.main([*argv, "--loss-window", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["norm"] for r in rows] == list(bench_segmentation.NORMS)
    assert all(0.0 <= r["eval_dice"] <= 1.0 and r["finite"] for r in rows)
    with pytest.raises(SystemExit):
        bench_segmentation.main(["--norms", "layernorm"])


bench_tabular = pytest.importorskip("benchmarks.bench_microbatch_tabular")


def test_the_tabular_benchmark_starts_every_variant_of_a_seed_from_the_same_weights(tmp_path: Path) -> None:
    """``bench_microbatch_tabular.py``: a seed's split is standardised by its training half and is the same on every
    call; every normalization of a seed starts from the BatchNorm network's Linear weights, the BKN variant
    converted (its three BatchNorm1d layers are BKN layers, the second and third wired through the Linears); a tiny
    grid runs end to end."""
    pytest.importorskip("sklearn")
    split, again = (bench_tabular.load_split("wine", seed=3) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(split[:4], again[:4]))
    torch.testing.assert_close(split.train_x.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    assert split.classes == 3 and len(split.train_x) + len(split.test_x) == 178
    variants = {norm: bench_tabular.make_variant(norm, 13, 3, 8, seed=0)[0] for norm in bench_tabular.NORMS}
    linears = {
        norm: [m.weight for m in model.modules() if isinstance(m, nn.Linear)] for norm, model in variants.items()
    }
    assert all(len(linears[norm]) == 4 for norm in bench_tabular.NORMS)
    assert all(
        torch.equal(a, b) for norm in ("bkn", "layernorm", "none") for a, b in zip(linears["batchnorm"], linears[norm])
    )
    assert [type(m).__name__ for m in variants["bkn"].modules() if "Norm" in type(m).__name__] == [
        "BatchKalmanNorm1d"
    ] * 3
    assert sum(m.chain is not None and m.chain.has_predecessor for m in variants["bkn"].modules()
               if isinstance(m, BatchKalmanNorm1d)) == 2  # fmt: skip
    out = tmp_path / "tabular.json"
    argv = ["--datasets", "wine", "--steps", "2", "--batches", "2", "--seeds", "0", "--width", "8"]
    assert bench_tabular.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["norm"] for r in rows] == list(bench_tabular.NORMS)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["finite"] for r in rows)
    for bad in (["--batches", "1"], ["--norms", "groupnorm"], ["--datasets", "iris"]):
        with pytest.raises(SystemExit):
            bench_tabular.main(bad)


def test_paired_quartiles_are_of_the_per_repeat_ratios() -> None:
    """Each repeat's BKN sample over its BatchNorm sample, not the ratio of separately sorted samples."""
    quartiles = bench_networks.paired_quartiles([2.0, 3.0, 6.0, 4.0, 5.0], [1.0, 3.0, 3.0, 2.0, 5.0])
    assert quartiles == (1.0, 2.0)  # ratios 2, 1, 2, 2, 1
    assert bench_networks.paired_quartiles([1.0], [1.0]) is None


bench_cold_dispatch = pytest.importorskip("benchmarks.bench_cold_dispatch")


def test_cold_dispatch_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench_cold_dispatch.py``: one line per figure and the same figures in its JSON, each a positive time."""
    out = tmp_path / "cold.json"
    assert bench_cold_dispatch.main(["--shape", "2x4x6x6", "--repeats", "2", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    record = json.loads(out.read_text())
    assert (record["shape"], record["threads"], record["repeats"]) == ([2, 4, 6, 6], 1, 2)
    names = ["add_ warm", "add_ after dw conv", "add_ after 1x1 conv", "add_ after relu", "add_ after sum",
             "2nd add_ after dw conv", "python loop warm", "python loop after dw conv"]  # fmt: skip
    assert list(record["us"]) == names
    assert [line.rsplit(None, 1)[0].strip() for line in lines] == names
    assert all(value > 0 for value in record["us"].values())


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--shape=2x3"], "--shape"),
        (["--shape=2x0x3x3"], "--shape"),
        (["--shape=2xAx3x3"], "--shape"),
        (["--repeats=0"], "--repeats"),
        (["--threads=0"], "--threads"),
    ],
)
def test_cold_dispatch_refuses_bad_arguments_with_exit_code_2(
    arguments: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        bench_cold_dispatch.main(arguments)
    assert raised.value.code == 2
    assert named in capsys.readouterr().err


def test_cold_dispatch_times_the_call_right_after_the_one_before() -> None:
    """``_median_us``: per sample, the op before, then the untimed calls, then the one timed call, ``repeats`` samples;
    the figure is the timed call's (here it sleeps, the others do not)."""
    calls: list[str] = []

    def before() -> None:
        calls.append("before")

    def timed() -> None:
        calls.append("timed")
        if calls[-2] != "before":  # the timed call of a sample (with skip=1: the second after `before`)
            time.sleep(0.002)

    figure = bench_cold_dispatch._median_us(before, timed, repeats=3, skip=1)
    assert calls == ["before", "timed", "timed"] * 3
    assert figure >= 2000.0


def test_prior_times_cover_every_layer_and_leave_the_steps_as_they_were() -> None:
    """``--prior-times``: a row per BKN layer with both times, and the timed steps (the repeated warm calls
    included) train the network exactly as untimed steps do: the repeats' priors are dropped and the forward's memo
    of predictions is put back after them."""
    torch.manual_seed(0)
    timed = _wired()
    untimed = copy.deepcopy(timed)
    x, target = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)

    def stepper(model: nn.Module) -> Callable[[], None]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), target).backward()
            optimizer.step()

        return step

    rows = bench_networks.prior_times(timed, stepper(timed), steps=2, repeats=3)
    step = stepper(untimed)
    for _ in range(2 + 2 + 1):  # the untimed steps, the timed ones, the one with the warm repeats
        step()
    assert [(row.layer, row.channels) for row in rows] == [("1", 4), ("4", 5)]
    assert all(row.in_network_us > 0 and row.warm_us > 0 and row.calls_per_step == 1.0 for row in rows)
    for mine, theirs in zip(timed.state_dict().values(), untimed.state_dict().values(), strict=True):
        if isinstance(mine, torch.Tensor):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_prior_times_command_line_writes_a_row_per_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--prior-times --json``: the printed table and the JSON hold one row per BKN layer of the network."""
    pytest.importorskip("monai")
    out = tmp_path / "prior.json"
    arguments = ["--networks", "resnet18", "--size", "32", "--batches", "2", "--repeats", "1", "--prior-times"]
    assert bench_networks.main([*arguments, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    layers = [row["layer"] for row in record["prior_times"]]
    assert len(layers) == 20 and len(set(layers)) == 20  # MONAI ResNet-18: 20 BatchNorm2d layers
    assert all(f"  {layer}\n" in printed for layer in layers)
    assert all(row["in_network_us"] > 0 and row["warm_us"] > 0 for row in record["prior_times"])
