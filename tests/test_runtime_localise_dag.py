"""Bisection localises across independent branches: a fault on a short branch that comes first in graph order,
with a longer independent branch after it, is found where the branches merge and walked back to its module.

Plain bisection over module outputs in graph order assumes that once a value diverges every later one does; here
the later branch agrees, so the search landed on the merge (``merge_bn``), an innocent module.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.export import export_onnx
from runtime.onnx_scopes import module_boundaries, node_scope
from runtime.parity import run_parity


def _unit(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.short = _unit(3, 8)
        self.long = nn.Sequential(*[_unit(3 if i == 0 else 8, 8) for i in range(5)])
        self.merge = nn.Conv2d(8, 8, 1, bias=False)
        self.merge_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.short(x)  # first in graph order
        b = self.long(x)  # independent of `short`
        y = self.merge_bn(self.merge(a + b))
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_bisect_walks_back_to_the_faulty_branch(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = convert_batchnorm(_TwoBranches().eval(), x).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, (x,), path, mode=mode)
    graph = onnx.load(path)
    (relu,) = [n for n in graph.graph.node if n.op_type == "Relu" and (node_scope(n) or ("",))[-1].endswith("short.2")]
    relu.op_type = "Abs"  # the fault: |x| for relu(x), in the short branch's last module
    planted = tmp_path / "planted.onnx"
    onnx.save(graph, planted)
    order = [b.module for b in module_boundaries(graph, {name for name, _ in model.named_modules()})]
    assert order.index("short.2") < order.index("long.0.2"), order  # the fault's branch comes first

    report = run_parity(model, planted, runtimes="ort:cpu:all", localise_method="bisect")
    (result,) = report.runtimes
    assert result.status == "failed"
    localisation = result.localisation
    assert localisation is not None and localisation.method == "bisect"
    assert localisation.first_module == "short.2", localisation.message
    assert localisation.last_passing == "short.1"  # its nearest upstream module output
