"""Reference cases for the TensorRT plugin harness (plugins/tensorrt/test/pluginGpuHarness.cpp).

The oracle is ``bkn_export.functional.batch_kalman_norm`` evaluated in float64 on the very
values the plugin receives (X rounded to its dtype first, the (C,) inputs in float32). For
each case the folder gets

* ``manifest.txt``: one line per case,
  ``case <name> <f32|f16> <epsilon> <fallback_ratio> <rank> <d0> ... <d{rank-1}>``;
* ``<name>.x``: X, C order (row-major, TensorRT's kLINEAR), in its dtype (float32 or IEEE half);
* ``<name>.params``: float32, 5·C values: prior_mean, prior_variance, prior_weight, scale, B;
* ``<name>.expected``: float64: Y (numel values), then posterior_mean (C), posterior_variance (C).

All files are little-endian. ``--small`` writes only cases of ≤ 4096 elements (what the
CPU test suite uses: the harness runs there without enqueue).

Usage::

    python benchmarks/gpu/plugin_reference.py OUT_DIR [--small]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bkn_export import functional


@dataclass(frozen=True)
class Case:
    """One plugin call: X shape and dtype, the node's attributes and how wide the prior is."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    epsilon: float
    fallback_ratio: float
    #: prior_variance = U(0.5, 1.5) · variance_scale; 1000 makes the fallback rule fire (p = 0).
    variance_scale: float

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total


def cases(small: bool) -> list[Case]:
    """Shapes of tests/test_tensorrt_plugin.py's launcher test, a ResNet-sized one, and an edge case.

    Each shape in float32 and float16, with the fallback rule off, at ratio 100 with the usual prior
    (it holds), and at ratio 100 with a prior 1000x wider than the batch (it fires, p = 0).
    (1, 4): one value per channel, batch variance 0: without the rule the posterior variance comes
    from the prior; with it the rule fires (mean(prior variance / max(S, 1e-12)) is huge) and Y = β.
    """
    shapes: list[tuple[int, ...]] = [(5, 3), (4, 6, 7, 5), (2, 3, 4, 5, 6), (1, 4), (64, 8, 33, 17), (8, 64, 56, 56)]
    settings = [(1e-5, 0.0, 1.0), (1e-3, 100.0, 1.0), (1e-5, 100.0, 1000.0)]
    found = []
    for shape in shapes:
        for dtype, tag in ((torch.float32, "f32"), (torch.float16, "f16")):
            for epsilon, ratio, scale in settings:
                label = "x".join(map(str, shape))
                # The setting, not the outcome: with (1, 4) the batch variance is 0 and the rule fires at ratio 100.
                rule = "norule" if ratio == 0 else ("rule100_wideprior" if scale > 1 else "rule100")
                case = Case(f"{tag}_{label}_{rule}", shape, dtype, epsilon, ratio, scale)
                if not small or case.numel <= 4096:
                    found.append(case)
    return found


def write_case(case: Case, folder: Path, seed: int) -> str:
    """Write the case's three files; returns its manifest line."""
    generator = torch.Generator().manual_seed(seed)
    channels = case.shape[1]
    x = (torch.randn(*case.shape, generator=generator) * 2 + 1).to(case.dtype)
    params = torch.stack(
        [
            torch.rand(channels, generator=generator) - 0.5,  # prior_mean
            (torch.rand(channels, generator=generator) + 0.5) * case.variance_scale,  # prior_variance
            torch.rand(channels, generator=generator) * 0.9,  # prior_weight
            torch.rand(channels, generator=generator) + 0.5,  # scale (γ)
            torch.rand(channels, generator=generator) - 0.5,  # B (β)
        ]
    ).to(torch.float32)
    prior_mean, prior_variance, prior_weight, scale, bias = params.double().unbind(0)
    exact = functional.batch_kalman_norm(
        x.double(), prior_mean, prior_variance, prior_weight, scale, bias, case.epsilon, case.fallback_ratio
    )
    (folder / f"{case.name}.x").write_bytes(x.contiguous().numpy().tobytes())
    (folder / f"{case.name}.params").write_bytes(params.contiguous().numpy().tobytes())
    expected = torch.cat([exact.output.reshape(-1), exact.posterior_mean, exact.posterior_variance])
    (folder / f"{case.name}.expected").write_bytes(expected.to(torch.float64).numpy().tobytes())
    tag = "f32" if case.dtype == torch.float32 else "f16"
    dims = " ".join(map(str, case.shape))
    return f"case {case.name} {tag} {case.epsilon!r} {case.fallback_ratio!r} {len(case.shape)} {dims}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--small", action="store_true", help="only cases of <= 4096 elements")
    args = parser.parse_args(argv)
    if sys.byteorder != "little":
        print("plugin_reference: the harness reads little-endian files; this machine is big-endian", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = [write_case(case, args.out_dir, seed) for seed, case in enumerate(cases(args.small))]
    (args.out_dir / "manifest.txt").write_text("\n".join(lines) + "\n")
    print(f"plugin_reference: {len(lines)} cases written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
