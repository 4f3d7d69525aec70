"""BKN under torch.distributed: SyncBatchKalmanNorm and DistributedDataParallel.

Multi-process tests spawn 2 CPU processes with the gloo backend on a free local port.
Each rank writes what it computed to a file; the test process compares it with a
single-process computation. Every spawn has a deadline (a rank that hangs fails the
test) and every collective a gloo timeout.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bkn_export import (
    BatchKalmanNorm2d,
    BKNInputError,
    DistributedError,
    SyncBatchKalmanNorm,
    convert_batchnorm,
    convert_sync_batchkalmannorm,
    describe_chain,
    wire_chain,
)
from bkn_export.demo.models import digits_resnet
from bkn_export.distributed import combine_batch_statistics
from bkn_export.nn import Transition

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT = timedelta(seconds=20)  # gloo gives up on a collective after this
SPAWN_DEADLINE_S = 90.0  # the whole spawn, including the children's `import torch`
ATOL = 1e-6  # the bound, float64; rtol 0
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_entry(rank: int, world_size: int, port: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        worker(rank, world_size, *args)
        # Every rank's outstanding collective work (DDP's bucketed all-reduces) completes before any rank tears
        # its process group down; without it a rank was seen aborting in C++ at exit (SIGABRT, gloo).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(worker: Callable[..., None], *args: Any, world_size: int = WORLD_SIZE) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` gloo processes; fail on error or hang."""
    context = mp.start_processes(
        _rank_entry, args=(world_size, _free_port(), worker, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {SPAWN_DEADLINE_S:.0f} s: a rank hangs")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _load_ranks(directory: Path, prefix: str = "", world_size: int = WORLD_SIZE) -> list[dict[str, Any]]:
    return [torch.load(directory / f"{prefix}rank{r}.pt") for r in range(world_size)]


# --------------------------------------------------------------------------- models


def _chain_model(transition: Transition) -> nn.Module:
    """Three wired BKN layers in float64; the 2nd and 3rd have a predecessor (ReLU, Conv between)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchKalmanNorm2d(4, transition=transition),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        BatchKalmanNorm2d(6, transition=transition),
        nn.ReLU(),
        nn.Conv2d(6, 5, 1),
        BatchKalmanNorm2d(5, transition=transition),
    ).double()
    wire_chain(model, torch.zeros(2, 3, 5, 5, dtype=torch.float64))
    with torch.no_grad():  # move BKN parameters off their uniform initial values
        for name, parameter in model.named_parameters():
            if name.endswith(("prior_weight_logit", "process_noise_raw", "transition_matrix")):
                parameter.add_(0.5 * torch.randn_like(parameter))
    return model


def _chain_inputs() -> tuple[Tensor, Tensor]:
    """x: (4, 3, 5, 5) and a loss weight for y: (4, 5, 5, 5), both float64."""
    generator = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64) + 0.5
    return x, torch.randn(4, 5, 5, 5, generator=generator, dtype=torch.float64)


def _step(model: nn.Module, x: Tensor, loss_weight: Tensor) -> dict[str, Any]:
    """One train-mode forward/backward of sum(y · loss_weight); what the comparison needs."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * loss_weight).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


# --------------------------------------------------------------------------- workers (run in the children)


#: Scenarios of the SyncBKN chain: transition and the batch size on each rank (4 samples in all).
SYNC_SCENARIOS: dict[str, tuple[Transition, list[int]]] = {
    "propagate-2x2": ("propagate", [2, 2]),
    "learned-2x2": ("learned", [2, 2]),
    "propagate-empty-rank": ("propagate", [4, 0]),
    "sampled-3-1": ("sampled", [3, 1]),
}


def _sync_chain_worker(rank: int, world_size: int, x: Tensor, loss_weight: Tensor, out: Path) -> None:
    for key, (transition, sizes) in SYNC_SCENARIOS.items():
        start = sum(sizes[:rank])
        shard = slice(start, start + sizes[rank])
        model = convert_sync_batchkalmannorm(_chain_model(transition)).train()
        torch.manual_seed(100 + rank)  # the `sampled` transition draws per-rank noise
        torch.save(_step(model, x[shard], loss_weight[shard]), out / f"{key}-rank{rank}.pt")


def _mismatched_channels_worker(rank: int, world_size: int, out: Path) -> None:
    layer = SyncBatchKalmanNorm(4 + rank).train()
    try:
        layer(torch.randn(2, 4 + rank, 3, 3))
        message = "no error"
    except DistributedError as error:
        message = str(error)
    torch.save({"message": message}, out / f"rank{rank}.pt")


def _ddp_worker(rank: int, world_size: int, x: Tensor, target: Tensor, out: Path) -> None:
    half = len(x) // world_size
    shard = slice(rank * half, (rank + 1) * half)
    for sync in (False, True):
        model = _demo_model(sync)
        ddp = DistributedDataParallel(model)  # no find_unused_parameters
        logits = ddp(x[shard])
        F.cross_entropy(logits, target[shard]).backward()
        torch.save(
            {"logits": logits.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}},
            out / f"sync{int(sync)}-rank{rank}.pt",
        )


def _ddp_inputs() -> tuple[Tensor, Tensor]:
    """x: (4, 1, 8, 8) float64 digits-shaped noise; target: (4,) classes."""
    generator = torch.Generator().manual_seed(2)
    return torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64), torch.tensor([3, 1, 4, 1])


def _demo_model(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = digits_resnet("bkn", width=4).double().train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("prior_weight_logit", "process_noise_raw")):
                parameter.add_(0.5 * torch.randn_like(parameter))
    return convert_sync_batchkalmannorm(model) if sync else model


# --------------------------------------------------------------------------- tests: 2 processes


# One spawn per group of scenarios (starting 2 processes costs seconds); each test checks one behaviour.


@pytest.fixture(scope="module")
def sync_chain_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sync_chain")
    run_on_ranks(_sync_chain_worker, *_chain_inputs(), out)
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run_on_ranks(_ddp_worker, *_ddp_inputs(), out)
    return out


@pytest.mark.parametrize("scenario", ["propagate-2x2", "learned-2x2", "propagate-empty-rank"])
def test_sync_bkn_on_two_ranks_equals_bkn_on_one_process_with_the_whole_batch(
    sync_chain_runs: Path, scenario: str
) -> None:
    """Outputs, input and parameter gradients, running statistics: 2 ranks == 1 process (float64).

    propagate-empty-rank (batches of 4 and 0): a rank with an empty batch contributes
    nothing; the other rank goes on and both end with the running statistics of the whole batch.
    """
    transition, _ = SYNC_SCENARIOS[scenario]
    ranks = _load_ranks(sync_chain_runs, f"{scenario}-")
    reference = _step(_chain_model(transition).train(), *_chain_inputs())

    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), reference["y"], atol=ATOL, rtol=0.0)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), reference["x_grad"], atol=ATOL, rtol=0.0)
    for name, expected in reference["grads"].items():
        # Each rank holds the gradient of all ranks' losses through its own computation;
        # their sum is the gradient of the whole loss (DDP's all-reduce, before averaging).
        summed = sum(r["grads"][name] for r in ranks)
        torch.testing.assert_close(summed, expected, atol=ATOL, rtol=0.0, msg=f"gradient of {name}")
    for r in ranks:
        for name, expected in reference["buffers"].items():
            torch.testing.assert_close(r["buffers"][name], expected, atol=ATOL, rtol=0.0, msg=f"buffer {name}")


def test_sampled_transition_shares_one_prior_across_ranks(sync_chain_runs: Path) -> None:
    """Ranks with 3 and 1 samples draw their own noise, but combine the sample moments: equal running statistics."""
    first, second = _load_ranks(sync_chain_runs, "sampled-3-1-")
    for name, value in first["buffers"].items():
        torch.testing.assert_close(second["buffers"][name], value, atol=0.0, rtol=0.0, msg=f"buffer {name}")


def test_mismatched_channel_counts_raise_on_every_rank_without_hanging(tmp_path: Path) -> None:
    run_on_ranks(_mismatched_channels_worker, tmp_path)
    for r, result in enumerate(_load_ranks(tmp_path)):
        assert re.search(r"rank 0: 4 channels.*rank 1: 5 channels", result["message"]), f"rank {r}: {result}"


@pytest.mark.parametrize("sync", [False, True], ids=["bkn-per-rank", "sync-bkn"])
def test_ddp_trains_the_demo_network_without_find_unused_parameters(ddp_runs: Path, sync: bool) -> None:
    """DDP over 2 ranks × batch 2: every parameter gets a gradient on every rank, and it is the right one.

    BKN (per-rank statistics): each rank's logits are those of the model on its own
    shard, and DDP's gradient is the mean of the per-shard gradients. SyncBKN: logits and
    gradient are those of one process on the whole batch of 4.
    """
    x, target = _ddp_inputs()
    ranks = _load_ranks(ddp_runs, f"sync{int(sync)}-")
    shards = [slice(0, 2), slice(2, 4)]
    if sync:
        expected_logits, expected_grads = _logits_and_grads(x, target)
        expected_logit_shards = [expected_logits[s] for s in shards]
    else:
        per_shard = [_logits_and_grads(x[s], target[s]) for s in shards]
        expected_logit_shards = [logits for logits, _ in per_shard]
        expected_grads = {n: torch.stack([grads[n] for _, grads in per_shard]).mean(0) for n in per_shard[0][1]}
    for r, result in enumerate(ranks):
        torch.testing.assert_close(result["logits"], expected_logit_shards[r], atol=ATOL, rtol=0.0)
        assert all(g is not None for g in result["grads"].values()), f"rank {r}: a parameter got no gradient"
        for name, expected in expected_grads.items():
            torch.testing.assert_close(result["grads"][name], expected, atol=ATOL, rtol=0.0, msg=f"rank {r}: {name}")


def _logits_and_grads(x: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    model = _demo_model(sync=False)
    logits = model(x)
    F.cross_entropy(logits, target).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- tests: one process


def test_training_without_a_process_group_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    model = convert_sync_batchkalmannorm(_chain_model("propagate")).train()
    with pytest.raises(DistributedError, match="init_process_group"):
        model(torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_eval_mode_is_bkn_and_needs_no_process_group() -> None:
    x, _ = _chain_inputs()
    plain = _chain_model("propagate").eval()
    sync = convert_sync_batchkalmannorm(_chain_model("propagate")).eval()
    torch.testing.assert_close(sync(x), plain(x), atol=0.0, rtol=0.0)


def test_conversion_keeps_parameters_buffers_and_wiring() -> None:
    model = _chain_model("propagate")
    before_chain = describe_chain(model)
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    converted = convert_sync_batchkalmannorm(model)

    layers = [m for m in converted.modules() if isinstance(m, BatchKalmanNorm2d | SyncBatchKalmanNorm)]
    assert layers and all(type(m) is SyncBatchKalmanNorm for m in layers)
    assert describe_chain(converted) == before_chain
    assert {n: p for n, p in converted.named_parameters()}.keys() == before.keys()
    assert all(p is before[n] for n, p in converted.named_parameters()), "parameters are shared, not copied"
    assert all(b is buffers[n] for n, b in converted.named_buffers())


def test_sync_checkpoint_loads_into_the_plain_bkn_model() -> None:
    sync = convert_sync_batchkalmannorm(_chain_model("learned"))
    plain = _chain_model("learned")
    with torch.no_grad():
        for parameter in sync.parameters():
            parameter.mul_(1.5)
    plain.load_state_dict(sync.state_dict())
    x, _ = _chain_inputs()
    torch.testing.assert_close(plain.eval()(x), sync.eval()(x), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combined_statistics_are_those_of_the_concatenated_groups(dtype: torch.dtype) -> None:
    """Chan's parallel formula on groups far from zero mean (where raw sums of squares cancel)."""
    generator = torch.Generator().manual_seed(3)
    groups = [1000.0 + torch.randn(n, 6, generator=generator, dtype=torch.float64) for n in (5, 0, 11, 2)]
    means = torch.stack([g.mean(0) if len(g) else torch.zeros(6, dtype=torch.float64) for g in groups])
    variances = torch.stack([g.var(0, correction=0) if len(g) else torch.zeros(6, dtype=torch.float64) for g in groups])
    counts = torch.tensor([float(len(g)) for g in groups])
    mean, variance = combine_batch_statistics(means.to(dtype), variances.to(dtype), counts)
    whole = torch.cat(groups)
    torch.testing.assert_close(mean, whole.mean(0).to(dtype))
    torch.testing.assert_close(variance, whole.var(0, correction=0).to(dtype), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- slow: the example


def _accuracy_of_example(nproc: int, *options: str) -> float:
    command = [sys.executable, str(REPO / "examples" / "ddp_digits.py"), "--nproc", str(nproc), *options]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=540, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True
    )
    match = re.search(r"test accuracy: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.slow
def test_ddp_example_on_two_processes_matches_one_process_accuracy() -> None:
    """examples/ddp_digits.py with the same global batch: 2 processes (SyncBKN) reach 1 process's accuracy.

    float64, so that rounding drift over ~500 steps stays far below what moves a test
    prediction; allowed: one of the 450 test images.
    """
    one = _accuracy_of_example(1, "--sync", "--float64")
    two = _accuracy_of_example(2, "--sync", "--float64")
    assert abs(two - one) <= 1.0 / 450 + 1e-9, (one, two)


def test_a_layer_registered_under_two_names_becomes_one_synchronised_layer() -> None:
    model = _chain_model("propagate")
    first = next(m for m in model.modules() if isinstance(m, BatchKalmanNorm2d))
    name = next(n for n, m in model.named_modules() if m is first)
    model.add_module("alias", first)
    sync = convert_sync_batchkalmannorm(model)
    assert isinstance(sync.alias, SyncBatchKalmanNorm) and sync.alias is sync.get_submodule(name)


@pytest.mark.parametrize("case", ["norm_act", "parametrized"])
def test_a_layer_a_plain_sync_layer_would_not_reproduce_is_refused_before_anything_changes(case: str) -> None:
    from torch.nn.utils import parametrize

    from bkn_export.errors import DistributedError
    from bkn_export.nn import BatchKalmanNorm2d
    from bkn_export.norm_act import BatchKalmanNormAct2d

    class Doubled(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    layer = BatchKalmanNormAct2d(4, act_layer=nn.ReLU) if case == "norm_act" else BatchKalmanNorm2d(4)
    if case == "parametrized":
        parametrize.register_parametrization(layer, "weight", Doubled())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer)
    with pytest.raises(DistributedError, match=r"'1'.*(BatchKalmanNormAct2d|parametrized)"):
        convert_sync_batchkalmannorm(model)
    assert model[1] is layer  # nothing replaced


def _convert_syncbatchnorm_with_a_sub_group(rank: int, world_size: int, out: Path) -> None:
    group = dist.new_group(list(range(world_size)))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4, process_group=group), nn.ReLU(), nn.Conv2d(4, 5, 1)
    ).double()
    convert_batchnorm(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    twin = copy.deepcopy(model)  # exports and parity copy the model
    torch.manual_seed(1 + rank)
    model.train()(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    torch.save(
        {
            "type": type(model[1]).__name__,
            "same_group": model[1].process_group is group and twin[1].process_group is group,
            "running_mean": model[1].running_mean.clone(),
        },
        out / f"rank{rank}.pt",
    )


def test_a_syncbatchnorm_on_a_sub_group_converts_keeping_its_group(tmp_path: Path) -> None:
    """A process group cannot be copied: the conversion's working copy, its guard and a copy of the converted model
    share it (it raised "cannot pickle ProcessGroup")."""
    run_on_ranks(_convert_syncbatchnorm_with_a_sub_group, tmp_path)
    ranks = _load_ranks(tmp_path)
    assert all(r["type"] == "SyncBatchKalmanNorm" and r["same_group"] for r in ranks)
    torch.testing.assert_close(ranks[0]["running_mean"], ranks[1]["running_mean"], rtol=0, atol=0)  # synchronised


def _one_value_worker(rank: int, world_size: int, out: Path) -> None:
    messages = []
    for batch in ((1, 0), (1, 1)):  # one value per channel across the group, then two
        layer = SyncBatchKalmanNorm(4).train()  # no predecessor: no prior
        try:
            layer(torch.randn(batch[rank], 4))
            messages.append("no error")
        except BKNInputError as error:
            messages.append(str(error))
    torch.save({"messages": messages}, out / f"rank{rank}.pt")


def test_one_value_per_channel_across_the_group_is_refused_on_every_rank_without_hanging(tmp_path: Path) -> None:
    """BatchNorm's and plain BKN's refusal, for the group's count: the layer would output β whatever the input."""
    run_on_ranks(_one_value_worker, tmp_path)
    for r, result in enumerate(_load_ranks(tmp_path)):
        one, two = result["messages"]
        assert re.search(r"more than 1 value per channel.*got 1 across the process group", one), f"rank {r}: {one}"
        assert two == "no error", f"rank {r}: {two}"


def test_a_training_export_of_a_synchronised_model_is_refused_by_name(tmp_path: Path) -> None:
    """It raised "training a SyncBatchKalmanNorm needs an initialised process group", which reads as about training."""
    from bkn_export.errors import ExportError
    from bkn_export.export import export_onnx

    model = convert_sync_batchkalmannorm(_chain_model("propagate")).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(ExportError, match=r"3 layer\(s\) are SyncBatchKalmanNorm \('1', '4', '7'\).*one process"):
        export_onnx(model, x, tmp_path / "sync.onnx", mode="training")
    assert not (tmp_path / "sync.onnx").exists()


def test_the_sync_conversion_keeps_a_layers_forward_hooks() -> None:
    """convert_sync_batchkalmannorm dropped the hooks of the layers it replaced (convert_batchnorm moves a
    BatchNorm's), which the chain then reported as removed by the user (a review of the fifth session of
    2026-12-07): the same hook dicts move, and a handle still removes its hook from the new layer."""
    model = _chain_model("propagate")
    handle = model[4].register_forward_pre_hook(lambda module, args: None)
    converted = convert_sync_batchkalmannorm(model)
    assert isinstance(converted[4], SyncBatchKalmanNorm)
    assert handle.id in converted[4]._forward_pre_hooks
    handle.remove()
    assert handle.id not in converted[4]._forward_pre_hooks
