"""Shared test configuration: markers that skip with a reason, deterministic seeds, the CUDA-route interpreter."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch
from support.triton_interpreter import InterpreterProcess


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _has_tensorrt() -> bool:
    spec = importlib.util.find_spec("tensorrt")
    # tensorrt-stubs alone leaves a `tensorrt/` folder of .pyi files: a namespace package
    # (origin None) that imports but has no bindings. Real TensorRT has tensorrt/__init__.py.
    return spec is not None and spec.origin is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (`import tensorrt` fails here); see README 'Verified where'")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not _has_tensorrt():
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def route_interpreter() -> Iterator[InterpreterProcess]:
    """A Triton-interpreter child with ``BKN_TRITON_ON_CPU=1``: there the CPU takes the CUDA route (the op's
    Triton kernels, the one-node step, every twin); one per test module."""
    pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")
    with InterpreterProcess(env={"BKN_TRITON_ON_CPU": "1"}) as process:
        yield process
