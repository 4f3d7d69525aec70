"""Train the BKN demo network on the built-in digits with DistributedDataParallel on N CPU processes.

Either let the script start the processes (torch.multiprocessing, gloo backend)::

    python examples/ddp_digits.py --nproc 2 --sync

or let torchrun start them (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    torchrun --standalone --nproc-per-node 2 examples/ddp_digits.py --sync

Every run uses the same *global* batch (``--global-batch``, split evenly over the
processes) and sees the same samples in the same global batches: a
``DistributedSampler`` with a fixed seed deals the positions of one shuffled order to
the ranks in turn (rank r takes positions r, r + N, ...), so the k-th global batch is
the same set of samples for any N. With ``--sync`` the BKN layers are
``SyncBatchKalmanNorm`` (statistics of the global batch), so N processes train like one;
without it each process normalizes with its own micro-batch's statistics, as
``nn.BatchNorm2d`` does under DDP. Rank 0 prints the test accuracy (eval mode, running
statistics). The run is deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from bkn_export import convert_sync_batchkalmannorm
from bkn_export.demo.data import load_digits_split
from bkn_export.demo.models import digits_resnet
from bkn_export.demo.training import evaluate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nproc", type=int, default=1, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--sync", action="store_true", help="use SyncBatchKalmanNorm (global-batch statistics)")
    parser.add_argument("--global-batch", type=int, default=8, help="samples per optimizer step, all ranks together")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--lr", type=float, default=0.05, help="initial SGD learning rate (for the global batch), cosine-decayed to 0"
    )
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage of the demo network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="train in float64 (N vs 1 process: less rounding drift)")
    return parser.parse_args(argv)


def train(rank: int, world_size: int, args: argparse.Namespace) -> float | None:
    """Train on this rank (the process group is initialised); rank 0 returns the test accuracy."""
    if args.global_batch % world_size:
        raise ValueError(f"--global-batch {args.global_batch} must be divisible by the {world_size} processes")
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    data = load_digits_split(seed=args.seed)
    model = digits_resnet("bkn", width=args.width)
    if args.float64:
        model = model.double()
        data = data._replace(x_train=data.x_train.double(), x_test=data.x_test.double())
    if args.sync:
        model = convert_sync_batchkalmannorm(model)
    ddp = DistributedDataParallel(model)  # BKN needs no find_unused_parameters
    dataset = TensorDataset(data.x_train, data.y_train)
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        dataset, world_size, rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(dataset, batch_size=args.global_batch // world_size, sampler=sampler, drop_last=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)
    steps = args.epochs * len(loader)  # the same on every rank and for every N
    # Cosine decay to 0: the final weights (and accuracy) depend less on the last few steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1.0 + math.cos(math.pi * k / steps)))
    ddp.train()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            loss = F.cross_entropy(ddp(images), labels)  # DDP averages the ranks' gradients
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    if rank != 0:
        return None
    accuracy, _ = evaluate(model, data.x_test, data.y_test)
    return accuracy


def _run_rank(rank: int, world_size: int, args: argparse.Namespace, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        started = time.perf_counter()
        accuracy = train(rank, world_size, args)
        if accuracy is not None:
            print(
                f"test accuracy: {accuracy:.4f}  ({world_size} process(es), global batch {args.global_batch}, "
                f"{'SyncBatchKalmanNorm' if args.sync else 'BatchKalmanNorm per rank'}, "
                f"{'float64' if args.float64 else 'float32'}, seed {args.seed}, "
                f"{time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        _run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, "env://")
        return
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_run_rank, args=(args.nproc, args, init_method), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
