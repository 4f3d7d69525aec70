"""The moments of a conv / linear output through its weight (:func:`bkn_export.chain.fast.affine_moments`),
forward + backward: the C kernels (``csrc/affine.c``) against the PyTorch forms.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_affine_moments.py [--repeats 41] [--dtype float32] [--large]
        [--threads 1] [--old-source /path/to/an/older/affine.c] [--shapes 1x1,3x3] [--json out.json]

For every shape (the conv shapes of MobileNetV3-Large, EfficientNet-B0, DenseNet-121 and ResNet-18, padded
convs with their coverage tables, 1×1 convs without; ``--large`` adds larger weights, for the thresholds in
:mod:`bkn_export.chain.fast`) the variants run interleaved in one process, one sample of each per repeat (each
variant first in turn); the table gives the median µs of one call of ``affine_moments`` followed by
``autograd.grad`` into (W, μ, σ²):

* ``C``: the library's kernels, whatever the weight's size (``fast._AFFINE_NATIVE_MATRIX`` and
  ``_AFFINE_NATIVE_WEIGHTS`` lifted while this variant runs, to show what the kernel would take);
* ``old C`` (with ``--old-source``): the same kernels compiled from another ``affine.c`` (with the package's
  ``common.h`` and flags) into a temporary library, its two functions swapped in for the variant;
* ``torch``: the PyTorch forms (:func:`bkn_export.native.disabled`) on ``--threads`` torch threads (default 1).

``default`` says which of them :class:`~bkn_export.chain.fast._AffineMoments` picks with these threads today.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bkn_export import native
from bkn_export.chain import fast


@dataclass(frozen=True)
class Shape:
    """One conv: ``out`` × ``inputs`` (per group) × ``kernel``, ``groups``, padding, on ``spatial``."""

    name: str
    out: int
    inputs: int
    kernel: int
    groups: int
    padding: int
    spatial: int


SHAPES = [
    Shape("1x1 960<-160 (MNv3)", 960, 160, 1, 1, 0, 7),
    Shape("1x1 160<-960 (MNv3)", 160, 960, 1, 1, 0, 7),
    Shape("1x1 240<-40 (MNv3)", 240, 40, 1, 1, 0, 28),
    Shape("1x1 1152<-192 (ENB0)", 1152, 192, 1, 1, 0, 7),
    Shape("1x1 128<-1024 (DN121)", 128, 1024, 1, 1, 0, 14),
    Shape("3x3 64<-64 (RN18)", 64, 64, 3, 1, 1, 56),
    Shape("3x3 256<-256 (RN18)", 256, 256, 3, 1, 1, 14),
    Shape("3x3 32<-128 (DN121)", 32, 128, 3, 1, 1, 28),
    Shape("dw 5x5 960 (MNv3)", 960, 1, 5, 960, 2, 7),
    Shape("dw 3x3 144 (ENB0)", 144, 1, 3, 144, 1, 56),
]
#: Larger weights (--large): where the kernels stop beating ATen (the thresholds in bkn_export.chain.fast).
LARGE = [
    Shape("1x1 512<-128", 512, 128, 1, 1, 0, 14),
    Shape("1x1 1280<-960 (MNv3 head)", 1280, 960, 1, 1, 0, 1),
    Shape("1x1 1280<-320 (ENB0 head)", 1280, 320, 1, 1, 0, 7),
    Shape("1x1 2048<-512 (RN50)", 2048, 512, 1, 1, 0, 7),
    Shape("3x3 128<-128 (RN18)", 128, 128, 3, 1, 1, 28),
    Shape("3x3 512<-512 (RN18)", 512, 512, 3, 1, 1, 7),
]


def _old_functions(source: Path, dtype: torch.dtype) -> dict[str, ctypes._CFuncPtr]:  # type: ignore[name-defined]
    """The two exported functions of ``source`` compiled alone (with the package's common.h and flags)."""
    directory = Path(tempfile.mkdtemp(prefix="bkn_affine_old_"))
    shutil.copy(source, directory / "affine.c")
    shutil.copy(native.SOURCES[0].parent / "common.h", directory / "common.h")
    target = directory / "libaffine_old.so"
    command = ["cc", *native.FLAGS, "-o", str(target), str(directory / "affine.c"), "-lm"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    library = ctypes.CDLL(str(target))
    suffix = "f32" if dtype == torch.float32 else "f64"
    functions = {}
    for name, count in (("affine_moments", 9), ("affine_moments_backward", 12)):
        function = getattr(library, f"bkn_{name}_{suffix}")
        function.restype = None
        function.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * count
        functions[name] = function
    return functions


@contextlib.contextmanager
def _swapped(functions: dict[str, ctypes._CFuncPtr] | None, dtype: torch.dtype) -> Iterator[None]:  # type: ignore[name-defined]
    """native.call's cached functions replaced by ``functions`` (None: unchanged)."""
    if functions is None:
        yield
        return
    saved = {name: native._FUNCTIONS.get((name, dtype)) for name in functions}
    native._FUNCTIONS.update({(name, dtype): f for name, f in functions.items()})
    try:
        yield
    finally:
        for name, f in saved.items():
            if f is None:
                native._FUNCTIONS.pop((name, dtype), None)
            else:
                native._FUNCTIONS[(name, dtype)] = f


@contextlib.contextmanager
def _limits_lifted() -> Iterator[None]:
    """The kernels run whatever the weight's size (both limits of bkn_export.chain.fast lifted)."""
    saved = fast._AFFINE_NATIVE_MATRIX, fast._AFFINE_NATIVE_WEIGHTS
    fast._AFFINE_NATIVE_MATRIX = fast._AFFINE_NATIVE_WEIGHTS = 1 << 62
    try:
        yield
    finally:
        fast._AFFINE_NATIVE_MATRIX, fast._AFFINE_NATIVE_WEIGHTS = saved


def _case(shape: Shape, dtype: torch.dtype) -> Callable[[], None]:
    """One forward + backward of affine_moments on this shape (fixed random inputs)."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(
        shape.inputs * shape.groups, shape.out, shape.kernel, padding=shape.padding, groups=shape.groups, bias=False
    ).to(dtype)
    coverage = fast._coverage(conv, (shape.spatial, shape.spatial), ((0, 0), (0, 0)), dtype)
    channels = shape.inputs * shape.groups
    weight = conv.weight.detach().clone().requires_grad_()
    mean = torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    variance = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.1).to(dtype).requires_grad_()
    grads = [torch.randn(shape.out, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2)]
    wrt = [weight, mean, variance]

    def run() -> None:
        outputs = fast.affine_moments(weight, None, mean, variance, coverage)
        torch.autograd.grad(outputs, wrt, grads)

    return run


def _ran_kernel(shape: Shape, dtype: torch.dtype) -> bool:
    """Whether _AffineMoments picks the C kernel for this shape by default (one thread)."""
    conv_weight = torch.zeros(shape.out, shape.inputs, shape.kernel * shape.kernel, dtype=dtype)
    channels = shape.inputs * shape.groups
    padded = shape.padding > 0 and shape.kernel > 1
    fraction = torch.ones(shape.kernel**2, dtype=dtype) if padded else None
    pairs = torch.ones(shape.kernel**2, shape.kernel**2, dtype=dtype) if padded else None
    ones = torch.ones(channels, dtype=dtype)
    return fast._native_affine(conv_weight, ones, ones, fraction, pairs) is not None


def _sample(run: Callable[[], None], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        run()
    return (time.perf_counter() - start) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=41, help="samples per variant and shape (median)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--old-source", type=Path, help="another affine.c to time as 'old C'")
    parser.add_argument("--shapes", help="comma-separated substrings of shape names to keep")
    parser.add_argument("--large", action="store_true", help="also the larger weights (thresholds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the kernels use one whatever)")
    parser.add_argument("--json", type=Path, help="write the medians here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if native.library() is None:
        print(f"no C library: {native.status()}")
        return 0
    print(
        f"native: {native.status()}; torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, "
        f"median of {args.repeats}"
    )
    old = _old_functions(args.old_source, dtype) if args.old_source else None
    names = ["C", *(["old C"] if old is not None else []), "torch"]
    shapes = [
        s
        for s in SHAPES + (LARGE if args.large else [])
        if not args.shapes or any(p in s.name for p in args.shapes.split(","))
    ]
    header = f"{'shape':24} {'W':>8} " + " ".join(f"{n + ' µs':>10}" for n in names)
    if old is not None:
        header += f" {'new/old':>8}"
    print(header + f" {'C/torch':>8} {'default':>8}")
    results = []
    for shape in shapes:
        run = _case(shape, dtype)
        for name in names:  # warm up (and the native build, the coverage tables)
            with _context(name, old, dtype):
                run()
        probe = _sample(run, 1)
        number = max(1, int(2000 / max(probe, 1.0)))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # each first in turn
                with _context(name, old, dtype):
                    samples[name].append(_sample(run, number))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        weights = shape.out * shape.inputs * shape.kernel**2
        line = f"{shape.name:24} {weights:8d} " + " ".join(f"{medians[n]:10.1f}" for n in names)
        if old is not None:
            line += f" {medians['C'] / medians['old C']:8.2f}"
        default = "C" if _ran_kernel(shape, dtype) else "torch"
        print(line + f" {medians['C'] / medians['torch']:8.2f} {default:>8}", flush=True)
        results.append({"shape": shape.name, "weights": weights, "default": default, **medians})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _context(name: str, old: dict[str, ctypes._CFuncPtr] | None, dtype: torch.dtype) -> contextlib.ExitStack:  # type: ignore[name-defined]
    stack = contextlib.ExitStack()
    if name == "torch":
        stack.enter_context(native.disabled())
    else:
        stack.enter_context(_limits_lifted())
        if name == "old C":
            stack.enter_context(_swapped(old, dtype))
    return stack


if __name__ == "__main__":
    sys.exit(main())
