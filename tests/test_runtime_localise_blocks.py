"""Localisation blames the block whose own code diverges, not the next module whose output is compared.

Found by a new user's session (docs/zoo-sweep.md): a fault in code written in a block's ``forward`` (a residual
add, a squeeze-and-excitation product) or in an activation module the block calls twice was blamed on an innocent
module downstream, because the only ONNX value that showed it was either the output of a module called twice
(skipped) or no module's output at all. Specification:

* a value that leaves a shared activation *and* its block is compared as the block's output (the block ran once);
* where the first diverging module's ONNX input already differs from its PyTorch input, the divergence started in
  the code that computed that input: the report names that module (``first_diverging_module``, ``own_code_of``).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.cli import main
from bkn_export.export import export_onnx
from runtime import polygraphy_io
from runtime.onnx_scopes import node_scope
from runtime.parity import run_parity


class _Block(nn.Module):
    """conv1 → bn1 → act → conv2 → bn2, times an SE gate computed in forward, plus the input; act again (shared)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))  # the block's own code: an SE-like gate
        y = self.bn3(self.conv3(y))
        return self.act(y + x)  # the block's own residual add, then the shared activation


class _Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.block1 = _Block(width)
        self.block2 = _Block(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(torch.relu(self.stem_bn(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module", params=["inference", "training"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    model = convert_batchnorm(model.eval(), x).eval()
    path = tmp_path_factory.mktemp("blocks") / f"{request.param}.onnx"
    export_onnx(model, (x,), path, mode=request.param)
    return model, path


def _planted(source: Path, target: Path, op_type: str, scope: str, replacement: str) -> str:
    """``source`` with the one ``op_type`` node whose innermost scope is ``scope`` turned into ``replacement``
    (the training export wraps the model: its scopes read ``model.<name>``)."""
    model = onnx.load(source)
    wanted = (scope, f"model.{scope}")
    nodes = [n for n in model.graph.node if n.op_type == op_type and (node_scope(n) or ("",))[-1] in wanted]
    assert len(nodes) == 1, [n.name for n in nodes]
    nodes[0].op_type = replacement
    onnx.save(model, target)
    return nodes[0].name


@pytest.mark.parametrize(
    ("op_type", "replacement"),
    [("Add", "Sub"), ("Mul", "Add")],
    ids=["residual add", "SE product"],
)
@pytest.mark.parametrize("method", ["auto", "bisect"])
def test_a_fault_in_a_blocks_own_code_is_blamed_on_the_block(
    exported: tuple[nn.Module, Path], tmp_path: Path, op_type: str, replacement: str, method: str
) -> None:
    model, path = exported
    planted = tmp_path / "planted.onnx"
    _planted(path, planted, op_type, "block1", replacement)
    report = run_parity(model, planted, runtimes="ort:cpu:all", localise_method=method)
    (result,) = report.runtimes
    assert result.status == "failed"
    assert result.localisation is not None
    assert result.localisation.first_module == "block1", result.localisation.message


def test_a_fault_in_a_module_is_still_blamed_on_that_module(exported: tuple[nn.Module, Path], tmp_path: Path) -> None:
    """The input check does not move the blame off a module whose own input agrees."""
    model, path = exported
    graph = onnx.load(path)
    weight = next(t for t in graph.graph.initializer if t.name.endswith("block1.conv3.weight"))
    weight.float_data[:] = []
    array = onnx.numpy_helper.to_array(weight) * 1.1
    weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(array.dtype), weight.name))
    planted = tmp_path / "weight.onnx"
    onnx.save(graph, planted)
    report = run_parity(model, planted, runtimes="ort:cpu:all")
    localisation = report.runtimes[0].localisation
    assert localisation is not None and localisation.own_code_of is None
    assert localisation.first_module is not None and "block1.conv3" in localisation.first_module


def test_the_repro_bundle_cuts_at_the_planted_node_and_expects_pytorchs_tensor(
    exported: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """The bundle expected the ONNX reference evaluator's output of the node, which a file that differs from PyTorch
    computes faithfully: it could never reproduce, and said "the failure needs the surrounding graph". It holds the
    block's own nodes from its values that agree with PyTorch (the squeeze-and-excitation's mean and sigmoid) to the
    planted one, fed PyTorch's tensors."""
    model, path = exported
    planted = tmp_path / "planted.onnx"
    name = _planted(path, planted, "Mul", "block1", "Add")
    report = run_parity(model, planted, runtimes="reference", repro_dir=tmp_path / "repro")
    bundle = tmp_path / "repro" / "reference"
    bundled = [n.name for n in onnx.load(bundle / "model.onnx").graph.node]
    assert bundled[-1] == name and len(bundled) <= 3, bundled
    readme = (bundle / "README.txt").read_text()
    assert "reproduces the failure: yes" in readme and "PyTorch's tensors there" in readme, readme
    assert report.runtimes[0].localisation is not None
    recheck = [
        "parity", str(bundle / "model.onnx"), "--load-inputs", str(bundle / "inputs.json"),
        "--load-outputs", str(bundle / "expected.json"), "--runtimes", "reference",
    ]  # fmt: skip
    assert list(polygraphy_io.load_outputs(bundle / "expected.json")) == ["pytorch"]  # where its values come from
    assert main(recheck) == 1


def test_a_block_the_exporter_names_by_another_registration_is_blamed_by_its_own_name(tmp_path: Path) -> None:
    """MONAI's DynUNet registers each down block twice (``downsamples.0`` is ``skip_layers.next_layer.downsample``)
    and calls its LeakyReLU twice; the exporter's scopes use the second name. A fault in the block's residual add
    was blamed on the bottleneck's first layer."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], res_block=True,
                       norm_name="batch", filters=[4, 8, 16])  # fmt: skip
    x = torch.randn(2, 1, 16, 16)
    model = convert_batchnorm(net.eval(), x).eval()
    assert model.downsamples[0] is model.skip_layers.next_layer.downsample
    path = tmp_path / "dynunet.onnx"
    export_onnx(model, (x,), path, mode="inference")
    planted = tmp_path / "planted.onnx"
    _planted(path, planted, "Add", "skip_layers.next_layer.downsample", "Sub")
    report = run_parity(model, planted, runtimes="ort:cpu:all")
    localisation = report.runtimes[0].localisation
    assert localisation is not None and localisation.first_module == "downsamples.0", localisation.message


def test_the_repro_bundle_is_judged_by_the_runs_own_tolerances(
    exported: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """A run at atol 1e-12 fails ONNX Runtime on float32 rounding; its bundle, re-run, fails at 1e-12 too. It was
    re-judged at the dtype defaults, under which rounding passes: "no (the failure needs the surrounding graph)"."""
    model, path = exported
    report = run_parity(model, path, runtimes="ort:cpu:all", atol=1e-12, rtol=0.0, repro_dir=tmp_path / "repro")
    assert report.runtimes[0].status.value == "failed", report.runtimes[0]
    readme = (tmp_path / "repro" / "ort_cpu_all" / "README.txt").read_text()
    assert "reproduces the failure: yes" in readme, readme
    recheck = readme.split("Re-check:\n  bkn ")[1].splitlines()[0].split()
    assert recheck[-4:] == ["--atol", "1e-12", "--rtol", "0.0"], recheck
    assert main(recheck) == 1  # the re-check command fails it too, as the run did


def test_a_fault_in_a_wired_layers_own_constant_is_blamed_on_that_layer(tmp_path: Path) -> None:
    """A wired BKN layer's node reads its predecessor's γ and β (the prior's input): that made the node's value the
    fused "bn1 + bn2", and the localisation compared bn2's ONNX input (conv2's output) with bn1's PyTorch input
    (conv1's), blaming conv2, which is untouched. A constant only bn2's nodes read, scaled, is blamed on bn2."""
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    model = convert_batchnorm(model.eval(), x).eval()
    path = tmp_path / "training.onnx"
    export_onnx(model, (x,), path, mode="training")
    graph = onnx.load(path)
    users: dict[str, set[str]] = {}
    for node in graph.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add((node_scope(node) or ("",))[-1].removeprefix("model."))
    own = [
        t
        for t in graph.graph.initializer
        if users.get(t.name) == {"4"} and numpy_helper.to_array(t).dtype.kind == "f" and numpy_helper.to_array(t).ndim
    ]
    assert own, "no constant read by the second BKN layer's nodes alone"
    values = numpy_helper.to_array(own[0]).copy()
    values *= 1.05
    own[0].CopyFrom(numpy_helper.from_array(values, own[0].name))
    broken = tmp_path / "broken.onnx"
    onnx.save(graph, broken)
    report = run_parity(model, broken, [x.numpy()], runtimes="ort:cpu:all")
    localisation = report.runtimes[0].localisation
    assert not report.passed and localisation is not None
    assert localisation.first_module == "4", localisation.message
    assert localisation.own_code_of is None, localisation.message
