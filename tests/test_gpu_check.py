"""benchmarks/gpu_check.sh and its pieces, checked on a CPU machine so that the first GPU run does not die of a typo.

What runs here (each test < 30 s on a 2-core machine):
* ``--dry-run`` (what CI runs): every step listed, every needed file present; a missing file fails it;
* without a GPU the script refuses with exit 2 and a message, and writes nothing;
* ``GPU_CHECK_SMOKE=1``: the driver itself (steps, timing, budget, summary, archive) with the env step and the
  benchmark steps on the CPU (``bench_kernels.py --smoke``, ``network_step.py --smoke``);
* the plugin harness compiled with CMake (sm_90) against the TensorRT headers in third_party/TensorRT/include,
  where present, and run without enqueue (``--host-only``): creator, ``getOutputShapes`` through the
  IExprBuilder test double, configurePlugin, getWorkspaceSize, onShapeChange.
What only the GPU machine runs: the steps themselves (docs/gpu-check.md).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TENSORRT_INCLUDE = ROOT / "third_party" / "TensorRT" / "include"
STEPS = ["env", "pytest", "plugin", "kernels", "network"]
SUMMARY_HEADINGS = [
    "## GPU check (benchmarks/gpu_check.sh)",
    "### Run",
    "### Steps",
    "### pytest -m gpu",
    "### TensorRT plugin on the GPU without TensorRT (plugins/tensorrt/test/pluginGpuHarness.cpp)",
    "### Triton BKN vs cuDNN BatchNorm, forward + backward (benchmarks/bench_kernels.py)",
    "### Whole-network train step, BKN vs BatchNorm (benchmarks/gpu/network_step.py)",
]


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return result.returncode == 0 and result.stdout.startswith("GPU")


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120, check=False)


def _required_files() -> list[str]:
    """The REQUIRED_FILES array of the script."""
    block = re.search(r"^REQUIRED_FILES=\(\n(.*?)^\)", SCRIPT.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert block, "REQUIRED_FILES=( ... ) not found in gpu_check.sh"
    return block.group(1).split()


# --------------------------------------------------------------------------- the driver


def test_dry_run_lists_every_step_and_finds_every_file() -> None:
    result = _run(["bash", str(SCRIPT), "--dry-run"])
    assert result.returncode == 0, result.stdout + result.stderr
    for step in STEPS:
        assert re.search(rf"^  {step} \(\d+ s\)$", result.stdout, flags=re.MULTILINE), step
    for file in _required_files():
        assert f"present  {file}" in result.stdout
    assert result.stdout.rstrip().endswith("gpu_check --dry-run: ok")


def test_dry_run_fails_naming_a_missing_file(tmp_path: Path) -> None:
    """A copy of the checkout lacking one needed file: --dry-run exits 1 and names it."""
    files = _required_files()
    for file in [*files, "benchmarks/gpu_check.sh"]:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, tmp_path / file)
    (tmp_path / "benchmarks/gpu/network_step.py").unlink()
    result = _run(["bash", str(tmp_path / "benchmarks/gpu_check.sh"), "--dry-run"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MISSING  benchmarks/gpu/network_step.py" in result.stdout


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the script would run")
def test_without_a_gpu_it_refuses_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run(["bash", str(SCRIPT)], OUT=str(out))
    assert result.returncode == 2
    assert "no NVIDIA GPU" in result.stderr and "--dry-run" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args", [["--only", "benchmarks"], ["--frobnicate"]], ids=["unknown-step", "unknown-flag"])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    result = _run(["bash", str(SCRIPT), "--dry-run", *args])
    assert result.returncode == 2
    assert "gpu_check: unknown" in result.stderr


def test_smoke_run_writes_one_summary_and_one_archive(tmp_path: Path) -> None:
    """Both benchmark steps on the CPU: each step recorded ok, the summary filled, the details archived."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = _run(
        ["bash", str(SCRIPT), "--only", "kernels,network"],
        OUT=str(out),
        GPU_CHECK_WORK=str(work),
        GPU_CHECK_SMOKE="1",
        GPU_CHECK_KERNEL_BATCHES="1 2",
    )
    logs = "".join(p.read_text() for p in sorted((work / "logs").glob("*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-details.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert summary in result.stdout  # printed as well
    for step in ("kernels", "network"):
        assert re.search(rf"^\| {step} \| ok \| [\d.]+ \|", summary, flags=re.MULTILINE), (step, summary)
    for step in ("env", "pytest", "plugin"):
        assert f"| {step} | not run |" in summary
    for dtype in ("float32", "bfloat16", "float16"):
        assert re.search(rf"^\| {dtype} NCHW \| 2 \| [\d.]+ \|", summary, flags=re.MULTILINE), (dtype, summary)
    for batch in (2, 4):
        row = rf"^\| smoke_convnet \| {batch} \| eager \| [\d.]+ \| [\d.]+ \| [\d.]+ \|"
        assert re.search(row, summary, flags=re.MULTILINE), summary
    assert [line for line in summary.splitlines() if line.startswith("#")] == SUMMARY_HEADINGS
    with tarfile.open(out / "gpu-check-details.tar.gz") as archive:
        names = set(archive.getnames())
    expected = {"steps.tsv", "summary.md", "kernels-float16.json", "network-smoke.json", "logs/network.log"}
    assert {f"./{name}" for name in expected} <= names
    assert not any(name.startswith("./scratch") for name in names)


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the env step would describe it")
def test_env_step_records_versions_and_the_missing_gpu(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    result = _run(["bash", str(SCRIPT), "--only", "env"], OUT=str(out), GPU_CHECK_WORK=str(work), GPU_CHECK_SMOKE="1")
    assert result.returncode == 0, result.stdout + result.stderr
    env = json.loads((work / "env.json").read_text())
    assert env["torch"] and env["python"] == platform.python_version()
    assert env["device"] is None and env["triton_kernels_used"] is None
    summary = (out / "summary.md").read_text()
    assert "| device | no CUDA device |" in summary
    assert "pip install skipped (GPU_CHECK_SMOKE=1)" in summary


def test_a_step_without_budget_left_is_skipped_and_recorded(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    result = _run(
        ["bash", str(SCRIPT), "--only", "kernels"],
        OUT=str(out),
        GPU_CHECK_WORK=str(work),
        GPU_CHECK_SMOKE="1",
        GPU_CHECK_BUDGET_S="10",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The setup before the step takes a second or two on a loaded machine: the used time is not asserted.
    row = r"\| kernels \| skipped \| 0 \| budget exhausted \(\d+ of 10 s used\) \|"
    assert re.search(row, (out / "summary.md").read_text())


# --------------------------------------------------------------------------- the pieces


def test_network_step_without_a_gpu_exits_2_pointing_at_smoke() -> None:
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    result = _run([sys.executable, "-m", "benchmarks.gpu.network_step", "--models", "resnet50"])
    assert result.returncode == 2
    assert "--smoke" in result.stdout


def test_ncu_target_runs_its_steps_on_the_cpu() -> None:
    """The program the optional ncu step profiles (without the profiler calls on the CPU)."""
    args = [sys.executable, "-m", "benchmarks.gpu.ncu_kernels", "target", "--variant", "bkn", "--smoke"]
    result = _run(args)
    assert result.returncode == 0, result.stderr
    assert "bkn step on (2, 4, 5, 5) torch.float32 ran on cpu" in result.stdout


def test_launch_overhead_probe_runs_its_kernels_under_the_interpreter() -> None:
    """The env step's host-µs-per-launch probe (device_info.launch_overhead_us), on the CPU under Triton's
    interpreter: every kind launches (a number, not an error text); the figures mean nothing here."""
    code = (
        "import json; from benchmarks.gpu.device_info import launch_overhead_us; "
        "print(json.dumps(launch_overhead_us(repeats=1, launches=2, device='cpu')))"
    )
    result = _run([sys.executable, "-c", code], TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) == {"aten_add", "triton_1_pointer", "triton_16_pointers_4_scalars"}
    assert all(isinstance(value, float) and value > 0 for value in figures.values()), figures


def test_summary_of_an_empty_run_says_what_did_not_run(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "benchmarks.gpu.summarize", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert [line for line in text.splitlines() if line.startswith("#")] == SUMMARY_HEADINGS
    for step in STEPS:
        assert f"| {step} | not run |" in text
    assert text.count("Not run") == 4  # pytest (with its reason), plugin, kernels, network


def test_results_template_has_the_summary_headings() -> None:
    """benchmarks/RESULTS.md's GPU section is what the script's summary replaces: same headings, same order."""
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    start = text.index(SUMMARY_HEADINGS[0])
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    assert [line for line in section.splitlines() if line.startswith("#")] == SUMMARY_HEADINGS


# --------------------------------------------------------------------------- the plugin harness (headers + nvcc)


@pytest.fixture(scope="module")
def harness_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin library + harness, built with CMake for sm_90 against third_party/TensorRT/include."""
    for tool in ("cmake", "nvcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not on PATH; the harness is built where the CUDA toolkit is installed")
    if not (TENSORRT_INCLUDE / "NvInferRuntime.h").is_file():
        pytest.skip(
            f"no TensorRT headers in {TENSORRT_INCLUDE.relative_to(ROOT)} (ignored folder, never committed; "
            "docs/gpu-check.md says how to fetch them); CI has none"
        )
    build = tmp_path_factory.mktemp("gpu_harness")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for command in (
        [
            "cmake",
            "-S",
            "plugins/tensorrt",
            "-B",
            str(build),
            *generator,
            "-DCMAKE_CUDA_ARCHITECTURES=90-real",
            f"-DTensorRT_INCLUDE_DIR={TENSORRT_INCLUDE}",
        ],
        ["cmake", "--build", str(build), "-j", "2", "--target", "bkn_plugin_gpu_harness"],
    ):
        result = _run(command)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return build


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plugin_reference")
    result = _run([sys.executable, "-m", "benchmarks.gpu.plugin_reference", str(folder), "--small"])
    assert result.returncode == 0, result.stderr
    return folder


def _harness(build: Path, reference: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return _run(
        [str(build / "bkn_plugin_gpu_harness"), str(build / "libbkn_tensorrt_plugin.so"), str(reference), *flags]
    )


def test_harness_host_side_checks_pass(harness_build: Path, small_reference: Path) -> None:
    """Everything but enqueue: creator, getOutputShapes via the test double, configure, workspace, onShapeChange."""
    result = _harness(harness_build, small_reference, "--host-only")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    cases = len((small_reference / "manifest.txt").read_text().splitlines())
    for check in (
        "PASS getOutputShapes: Y has X's dimension expressions (N, 6, H, 5)",
        "PASS getOutputShapes: posterior_mean and posterior_variance are (C,) = (6,)",
        "PASS getOutputShapes refuses a rank-1 X, naming 'X'",
        "INFO getOutputShapes made 0 IExprBuilder calls; Y = (N, 6, H, 5)",
    ):
        assert check in lines
    assert sum(line.endswith(": onShapeChange (actual shape)") for line in lines) == cases
    assert lines[-1] == f"OK (0 failures, {cases} cases, host only: enqueue not run)"


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_harness_without_a_gpu_exits_3_unless_host_only(harness_build: Path, small_reference: Path) -> None:
    result = _harness(harness_build, small_reference)
    assert result.returncode == 3
    assert "no CUDA device" in result.stderr and "--host-only" in result.stderr


def test_harness_refuses_a_reference_that_does_not_match_its_manifest(
    harness_build: Path, small_reference: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "reference"
    shutil.copytree(small_reference, broken)
    first = (broken / "manifest.txt").read_text().split()[1]
    (broken / f"{first}.x").write_bytes(b"\0" * 3)
    result = _harness(harness_build, broken, "--host-only")
    assert result.returncode == 2
    assert f"{first}: file sizes do not match the manifest's shape" in result.stderr


def test_graphed_agreement_compares_every_parameter_and_buffer() -> None:
    """``network_step.compare_states``, what judges a captured step against eager steps: equal states agree; a
    running statistic off by 1% (a replay that missed an update) and a counter off by one each fail, named."""
    import copy

    import torch

    from benchmarks.gpu import network_step

    torch.manual_seed(0)
    model = network_step.smoke_convnet().train()
    model(torch.randn(4, 3, 16, 16))
    same = copy.deepcopy(model)
    assert network_step.compare_states(model, same)["passed"]
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        noisy[0].weight.add_(1e-7)  # float32 noise of a few steps
    assert network_step.compare_states(model, noisy)["passed"]
    stale = copy.deepcopy(model)
    with torch.no_grad():
        stale[4].running_var.mul_(1.01)
    verdict = network_step.compare_states(model, stale)
    assert not verdict["passed"] and verdict["worst"] == "4.running_var" and "4.running_var" in verdict["failed"][0]
    counted = copy.deepcopy(model)
    counted[1].num_batches_tracked.add_(1)
    verdict = network_step.compare_states(model, counted)
    assert not verdict["passed"] and verdict["failed"] == ["1.num_batches_tracked: 1 != 2"]
