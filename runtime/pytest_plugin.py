"""pytest plugin (entry point ``pytest11: bkn_parity``): the ``bkn_parity`` fixture.

Loaded in every pytest run where bkn-export is installed, so this module imports only
pytest; torch, onnx and onnxruntime are imported when a test calls the fixture.

Usage in a user's test::

    def test_my_model_exports(bkn_parity):
        report = bkn_parity(model, torch.randn(2, 3, 32, 32), mode="training", atol=1e-4)

Options: ``--bkn-parity-runtimes`` (default ``all``) and ``--bkn-parity-report-dir``
(write JSON + HTML reports of every check there, one sub-directory per test, named by the test and a hash of its
node id; the first check of a mode is ``parity_<mode>``, later ones ``parity_<mode>_<n>``, so none is overwritten).
A check for which none of the chosen runtimes is available here skips the test, with the reasons; a runtime asked
for by its full name (not ``all``, not a prefix such as ``ort``) that is unavailable while others ran is reported
as a warning, and so are the file's outputs that the model does not return (not compared; the report's notes).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

__all__ = ["bkn_parity"]


def _report_folder(nodeid: str) -> str:
    """One folder per test, also for tests whose ids differ only in characters a path cannot keep
    (``test[a/b]``, ``test[a:b]``) or that share a name in two modules: the readable part, then a hash of the id."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.rsplit("::", 1)[-1])[:80]
    return f"{readable}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"


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


def _named_runtimes(chosen: Any) -> set[str]:
    """The names in a runtime selection (a comma-separated string or a sequence); a runtime is asked for by name
    where its full name is among them (``ort:cuda``), not where a prefix (``ort``) or ``all`` selected it: those
    select what this machine has, and the ones it lacks are no surprise."""
    names = chosen.split(",") if isinstance(chosen, str) else chosen if isinstance(chosen, (list, tuple)) else []
    return {str(name).strip() for name in names}


@pytest.fixture
def bkn_parity(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A callable ``(model, inputs, mode="inference", runtimes=None, atol=None, rtol=None, **kw) -> ParityReport``.

    Exports ``model`` into the test's ``tmp_path`` and calls :func:`runtime.assert_parity`;
    a mismatch fails the test with the runtimes, errors and first diverging module.
    """
    runtimes_option = request.config.getoption("--bkn-parity-runtimes")
    report_root = request.config.getoption("--bkn-parity-report-dir")
    if report_root:  # relative to where pytest was started, not to a directory a test changed into
        report_root = str(Path(request.config.invocation_params.dir) / report_root)
    calls = {"count": 0}

    def check(
        model: Any,
        inputs: Any,
        mode: str = "inference",
        runtimes: Any = None,
        atol: float | None = None,
        rtol: float | None = None,
        **kwargs: Any,
    ) -> Any:
        from runtime.assertions import assert_parity
        from runtime.errors import NoRuntimeRanError

        # Every check of the test keeps its own files: parity_<mode>_<n> (n counts the test's checks).
        calls["count"] += 1
        stem = f"parity_{mode}" if calls["count"] == 1 else f"parity_{mode}_{calls['count']}"
        if report_root and "report_dir" not in kwargs:
            kwargs["report_dir"] = f"{report_root}/{_report_folder(request.node.nodeid)}"
            kwargs.setdefault("report_name", stem)
        if "onnx_path" not in kwargs:
            kwargs.setdefault("export_to", tmp_path / f"bkn_{stem}.onnx")
        chosen = runtimes if runtimes is not None else runtimes_option  # an empty list is refused, not "all"
        try:
            report = assert_parity(model, inputs, mode, chosen, atol, rtol, **kwargs)
        except NoRuntimeRanError as error:  # the environment lacks every chosen runtime: nothing was compared
            pytest.skip(str(error))
        named = _named_runtimes(chosen)
        for result in report.runtimes:  # runtimes asked for by name and not had: said, not silently dropped
            if str(result.status) == "unavailable" and result.runtime in named:
                warnings.warn(f"bkn_parity: {result.runtime} did not run: {result.reason}", stacklevel=2)
        if report.uncompared_outputs:  # the verdict covers fewer outputs than the file has
            uncompared = ", ".join(repr(name) for name in report.uncompared_outputs)
            warnings.warn(
                f"bkn_parity: output(s) {uncompared} of the file not compared: the model returns no such output",
                stacklevel=2,
            )
        return report

    return check
