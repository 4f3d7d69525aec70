"""Reports: the JSON follows its schema, the HTML is self-contained, the table names every runtime."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from test_runtime_support import digits_inputs, exported_digits, trained_digits, workdir

from runtime.assertions import failure_message
from runtime.parity import SCHEMA_VERSION, ParityReport, RuntimeResult, Status, run_parity
from runtime.report import SCHEMA_PATH, load_schema, render_html, report_text, write_html, write_json


@functools.cache
def failing_report() -> ParityReport:
    """A parity run on a model with one perturbed weight: passes on nothing, localised."""
    model = onnx.load(exported_digits("inference"))
    for tensor in model.graph.initializer:
        if tensor.name == "block1.conv2.weight":
            array = numpy_helper.to_array(tensor).copy()
            array.flat[3] -= 0.7
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    path = workdir() / "report_perturbed.onnx"
    onnx.save(model, path)
    return run_parity(trained_digits(), path, digits_inputs(), runtimes="ort:cpu,reference")


@functools.cache
def passing_report() -> ParityReport:
    return run_parity(trained_digits(), exported_digits("training"), digits_inputs(), mode="training")


@functools.cache
def failing_saved_outputs_report() -> ParityReport:
    """The perturbed file against saved outputs (no PyTorch model): localised node by node ("nodes")."""
    failing_report()  # writes the perturbed file
    model = trained_digits().eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(digits_inputs()[0])).numpy()
    output = onnx.load(exported_digits("inference")).graph.output[0].name
    path = workdir() / "report_perturbed.onnx"
    return run_parity(None, path, digits_inputs(), runtimes="reference", reference_outputs=[{output: expected}])


@pytest.mark.parametrize("which", ["passing", "failing", "failing-saved"])
def test_json_report_validates_against_the_documented_schema(tmp_path: Path, which: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    reports = {"passing": passing_report, "failing": failing_report, "failing-saved": failing_saved_outputs_report}
    report = reports[which]()
    path = write_json(report, tmp_path / "report.json")
    data = json.loads(path.read_text())
    jsonschema.validate(data, load_schema())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["passed"] is (which == "passing")
    statuses = {r["runtime"]: r["status"] for r in data["runtimes"]}
    assert statuses["reference"] == ("passed" if which == "passing" else "failed")
    if which == "failing-saved":
        assert {r["localisation"]["method"] for r in data["runtimes"]} == {"nodes"}
    if which == "failing":
        localised = [r["localisation"] for r in data["runtimes"] if r["status"] == "failed"]
        assert localised and all(loc["first_diverging_module"] == "block1.conv2 + block1.norm2" for loc in localised)


def test_schema_file_ships_with_the_package_and_documents_every_top_level_field() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert SCHEMA_PATH.parent.name == "runtime"  # package data: runtime/*.json
    for name in schema["required"]:
        assert name in schema["properties"]


def test_html_report_is_self_contained_with_one_row_per_runtime_and_output() -> None:
    report = failing_report()
    page = render_html(report)
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page), "the report must not load anything"
    assert "<script" not in page
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]*)</td><td class='(\w+)'", page)
    expected = [(r.runtime, c.output) for r in report.runtimes for c in r.outputs]
    assert [(runtime, output) for runtime, output, _ in rows if output] == expected
    plots = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(plots) == 1 + len(report.failures())  # one histogram per output, one localisation plot per failure
    assert "block1.conv2 + block1.norm2" in page


def test_terminal_report_lists_runtimes_verdict_and_localisation() -> None:
    text = report_text(failing_report())
    for runtime in ("ort:cpu:disable_all", "ort:cpu:all", "reference"):
        assert runtime in text
    assert "parity FAILED" in text
    assert "first diverging module: block1.conv2 + block1.norm2" in text
    assert "parity: " in report_text(passing_report()) and "agree with PyTorch" in report_text(passing_report())


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_html_report_renders_in_headless_chromium_with_plots_visible(tmp_path: Path) -> None:
    """Chromium loads the file (no network), lays out the plots and we check the pixels.

    The page's images are measured by dumping the DOM after layout: each <img> must
    have decoded to a non-zero natural size; a screenshot is checked to hold the plot
    colours (the red bars of the localisation plot) rather than a blank page.
    """
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium)")
    page = write_html(failing_report(), tmp_path / "report.html")
    # Replace the document with the decoded sizes of its images once loaded, then dump it.
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text() + "<script>window.addEventListener('load',()=>{document.title='sizes:'+"
        "[...document.images].map(i=>i.complete?i.naturalWidth+'x'+i.naturalHeight:'0x0').join(',');});</script>"
    )
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    dom = subprocess.run(
        [chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    sizes = re.search(r"<title>sizes:([^<]*)</title>", dom)
    assert sizes, dom[:500]
    dims = [tuple(int(v) for v in s.split("x")) for s in sizes.group(1).split(",")]
    assert len(dims) == 1 + len(failing_report().failures())
    assert all(w > 300 and h > 150 for w, h in dims), dims
    screenshot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1200,2000", f"--screenshot={screenshot}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(str(screenshot))[..., :3]
    red_bars = (pixels[..., 0] > 0.65) & (pixels[..., 1] < 0.25) & (pixels[..., 2] < 0.25)
    assert red_bars.sum() > 500, "no red localisation bars visible in the screenshot"
    assert pixels.std() > 0.05, "the screenshot is blank"


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["passed", "error"], "1 of 2 runtime(s) could not run the file"),
        (["failed", "passed", "passed"], "1 of 3 runtime(s) differ"),
        (["failed", "error", "passed"], "1 of 3 runtime(s) differ, 1 runtime(s) could not run the file"),
    ],
)
def test_the_verdict_counts_an_engine_that_crashed_apart_from_one_that_differs(
    statuses: list[str], expected: str
) -> None:
    """'parity FAILED: 1 of 7 runtime(s) differ' was printed where the ONNX reference evaluator crashed on a file
    (its 1-D MaxPool with pads) that every other runtime ran and agreed with: nothing differed."""
    runtimes = [
        RuntimeResult(f"r{i}", Status(s), reason="IndexError" if s == "error" else "") for i, s in enumerate(statuses)
    ]
    report = ParityReport("m.onnx", "", "inference", [], [], "pytorch (eval)", runtimes, "", {})
    assert report.failure_counts() == expected
    assert f"parity FAILED: {expected}" in report_text(report)
    assert f"failed for m.onnx: {expected} (against PyTorch)" in failure_message(report)
