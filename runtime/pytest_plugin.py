"""pytest plugin (entry point ``pytest11: bkn_parity``): the ``bkn_parity`` fixture.

Loaded in every pytest run where bkn-export is installed, so this module imports only
pytest; torch, onnx and onnxruntime are imported when a test calls the fixture.

Usage in a user's test::

    def test_my_model_exports(bkn_parity):
        report = bkn_parity(model, torch.randn(2, 3, 32, 32), mode="training", atol=1e-4)

Options: ``--bkn-parity-runtimes`` (default ``all``) and ``--bkn-parity-report-dir``
(write JSON + HTML reports of every check there, one sub-directory per test; the first
check of a mode is ``parity_<mode>``, later ones ``parity_<mode>_<n>``, so none is overwritten).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

__all__ = ["bkn_parity"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bkn_parity", "bkn-export parity checks")
    group.addoption(
        "--bkn-parity-runtimes",
        default="all",
        help="runtimes the bkn_parity fixture checks: 'all' or a comma-separated list (e.g. ort:cpu,reference)",
    )
    group.addoption(
        "--bkn-parity-report-dir",
        default=None,
        help="write each bkn_parity check's JSON and HTML report under this directory",
    )


@pytest.fixture
def bkn_parity(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A callable ``(model, inputs, mode="inference", runtimes=None, atol=None, rtol=None, **kw) -> ParityReport``.

    Exports ``model`` into the test's ``tmp_path`` and calls :func:`runtime.assert_parity`;
    a mismatch fails the test with the runtimes, errors and first diverging module.
    """
    runtimes_option = request.config.getoption("--bkn-parity-runtimes")
    report_root = request.config.getoption("--bkn-parity-report-dir")
    calls = {"count": 0}

    def check(model: Any, inputs: Any, mode: str = "inference", runtimes: Any = None, **kwargs: Any) -> Any:
        from runtime.assertions import assert_parity

        # Every check of the test keeps its own files: parity_<mode>_<n> (n counts the test's checks).
        calls["count"] += 1
        stem = f"parity_{mode}" if calls["count"] == 1 else f"parity_{mode}_{calls['count']}"
        if report_root and "report_dir" not in kwargs:
            kwargs["report_dir"] = f"{report_root}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', request.node.name)}"
            kwargs.setdefault("report_name", stem)
        if "onnx_path" not in kwargs:
            kwargs.setdefault("export_to", tmp_path / f"bkn_{stem}.onnx")
        return assert_parity(model, inputs, mode, runtimes or runtimes_option, **kwargs)

    return check
