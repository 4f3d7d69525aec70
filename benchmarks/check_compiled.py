"""A converted network's train step compiled with inductor against eager, in float64 (a by-hand check).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/check_compiled.py [--network resnet18] [--size 64] [--batch 2] [--rows 6]

Builds a network of ``benchmarks/bench_networks.py`` from seed 0, converts it with ``convert_batchnorm`` (default
options), casts it to float64, and runs one forward + backward (loss: the output's sum of squares) twice: eagerly with
the reference moments (``bkn_export.chain.fast.reference_only()``: what a compiled graph traces) and under
``torch.compile`` (default inductor backend; on this CPU its C++ code, on a GPU its Triton code). Prints the largest
difference of the output, of every floating-point buffer (running statistics) and of each parameter's gradient, each
relative to the eager tensor's largest magnitude, and the ``--rows`` parameters with the largest relative gradient
difference with their absolute difference and scale (a gradient whose scale is rounding noise, such as a conv bias
before BatchNorm, shows up there with a scale near 1e-17). Exit code 0; a compile error propagates.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from bench_networks import NETWORKS  # noqa: E402

from bkn_export import convert_batchnorm  # noqa: E402
from bkn_export.chain import fast  # noqa: E402


def _relative(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    """(|got - want|_max / |want|_max, |got - want|_max, |want|_max)."""
    difference = (got - want).abs().max().item()
    scale = want.abs().max().item()
    return difference / max(scale, 1e-300), difference, scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rows", type=int, default=6)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    example = torch.randn(2, 3, args.size, args.size)
    model = convert_batchnorm(NETWORKS[args.network](), example).double().train()
    eager = copy.deepcopy(model)
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=torch.float64)
    with fast.reference_only():
        expected = eager(x)
        expected.square().sum().backward()
    got = torch.compile(model)(x)
    got.square().sum().backward()
    output = _relative(got, expected)[0]
    buffers = max(
        (_relative(a, b)[0] for a, b in zip(model.buffers(), eager.buffers()) if b.is_floating_point()), default=0.0
    )
    rows = sorted(
        ((*_relative(p.grad, q.grad), name) for (name, p), (_, q) in zip(model.named_parameters(),
         eager.named_parameters()) if p.grad is not None and q.grad is not None),
        reverse=True,
    )  # fmt: skip
    print(f"{args.network}, float64, inductor vs eager: output {output:.2e}, running statistics {buffers:.2e}")
    print("parameters with the largest relative gradient difference:")
    for relative, difference, scale, name in rows[: args.rows]:
        print(f"  {name:<44} relative {relative:.2e}  (difference {difference:.2e}, scale {scale:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
