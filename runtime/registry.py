"""Which runtimes exist on this machine, and choosing some by name.

Names: ``reference`` (ONNX reference evaluator), ``ort:<provider>:<level>`` (ONNX
Runtime, e.g. ``ort:cpu:all``; levels in :data:`runtime.backends.ort.OPTIMIZATION_LEVELS`)
and ``tensorrt``. A selection is ``all`` or a comma-separated list of names or
prefixes: ``ort`` picks every ONNX Runtime configuration, ``ort:cpu`` every level of
the CPU provider. The PyTorch reference (``pytorch``) is always run and is not chosen here.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bkn_export.errors import UnknownRuntimeError
from runtime.backends.base import Availability, Backend

__all__ = ["RuntimeEntry", "discover", "select"]

#: GPU providers reported even when this onnxruntime package does not list them, so a
#: report says why they did not run.
_NOTABLE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass
class RuntimeEntry:
    """A runtime name, whether it can run here, and how to make a fresh backend for it."""

    name: str
    availability: Availability
    make: Callable[[], Backend] | None = None


def _onnxruntime_entries(custom_op_libraries: Sequence[str | os.PathLike[str]]) -> list[RuntimeEntry]:
    from runtime.backends.ort import OPTIMIZATION_LEVELS, OnnxRuntimeBackend, _probe_provider, provider_short_name

    try:
        import onnxruntime as ort
    except ImportError as error:
        return [RuntimeEntry("ort", Availability(False, f"onnxruntime does not import: {error}"))]
    providers = list(ort.get_available_providers())
    providers += [p for p in _NOTABLE_PROVIDERS if p not in providers]
    entries: list[RuntimeEntry] = []
    for provider in providers:
        availability = _probe_provider(provider)
        if not availability.ok:
            entries.append(RuntimeEntry(f"ort:{provider_short_name(provider)}", availability))
            continue
        for level in OPTIMIZATION_LEVELS:

            def make(provider: str = provider, level: str = level) -> Backend:
                return OnnxRuntimeBackend(provider, level, custom_op_libraries)

            backend = make()
            entries.append(RuntimeEntry(backend.name, backend.available(), make))
    return entries


def _tensorrt_entry(plugin_libraries: Sequence[str | os.PathLike[str]]) -> RuntimeEntry:
    try:
        from runtime.backends import tensorrt as trt_module
    except ImportError as error:
        return RuntimeEntry("tensorrt", Availability(False, f"the TensorRT backend does not import: {error}"))
    preferred = getattr(trt_module, "TensorRTBackend", None)
    classes = [preferred] if inspect.isclass(preferred) and issubclass(preferred, Backend) else []
    classes += [
        c
        for c in vars(trt_module).values()
        if inspect.isclass(c) and issubclass(c, Backend) and c is not Backend and not inspect.isabstract(c)
    ]
    if not classes:
        return RuntimeEntry("tensorrt", Availability(False, "runtime.backends.tensorrt defines no backend class"))
    cls: Any = classes[0]
    accepts_plugins = "plugin_libraries" in inspect.signature(cls).parameters

    def make() -> Backend:
        return cls(plugin_libraries=list(plugin_libraries)) if accepts_plugins else cls()

    try:
        backend = make()
        availability = backend.available()
        name = getattr(backend, "name", "tensorrt") or "tensorrt"
    except Exception as error:  # available() must not raise; report a broken backend instead
        return RuntimeEntry("tensorrt", Availability(False, f"the TensorRT backend failed to start: {error}"))
    return RuntimeEntry(name, availability, make)


def discover(
    custom_op_libraries: Sequence[str | os.PathLike[str]] = (),
    plugin_libraries: Sequence[str | os.PathLike[str]] = (),
) -> list[RuntimeEntry]:
    """Every ONNX runtime configuration known here, available or not (with the reason)."""
    from runtime.backends.reference import ReferenceEvaluatorBackend

    reference = ReferenceEvaluatorBackend()
    entries = _onnxruntime_entries(custom_op_libraries)
    entries.append(RuntimeEntry(reference.name, reference.available(), ReferenceEvaluatorBackend))
    entries.append(_tensorrt_entry(plugin_libraries))
    return entries


def select(entries: Sequence[RuntimeEntry], spec: str | Sequence[str] = "all") -> list[RuntimeEntry]:
    """The entries a selection names (see the module docstring), in discovery order.

    Raises :class:`UnknownRuntimeError` listing the known and the available names when a
    name matches nothing.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names or names == ["all"]:
        return list(entries)
    chosen: list[RuntimeEntry] = []
    for name in names:
        matches = [e for e in entries if e.name == name or e.name.startswith(name + ":")]
        if not matches:
            available = [e.name for e in entries if e.availability.ok]
            known = [e.name for e in entries]
            raise UnknownRuntimeError(
                f"unknown runtime {name!r}. Available here: {', '.join(available) or 'none'}; "
                f"known: {', '.join(known)}; or 'all', or a prefix such as 'ort' or 'ort:cpu'"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return [e for e in entries if e in chosen]
