"""Which runtimes exist on this machine, and choosing some by name.

Names: ``reference`` (ONNX reference evaluator), ``ort:<provider>:<level>`` (ONNX
Runtime, e.g. ``ort:cpu:all``; levels in :data:`runtime.backends.ort.OPTIMIZATION_LEVELS`),
``openvino:<device>`` (e.g. ``openvino:cpu``) and ``tensorrt``. A selection is ``all`` or a
comma-separated list of names or prefixes: ``ort`` picks every ONNX Runtime
configuration, ``ort:cpu`` every level of the CPU provider, ``openvino`` every OpenVINO
device. The PyTorch reference (``pytorch``) is always run and is not chosen here.

Adding a runtime is a backend module plus one function in :data:`FACTORIES`, a plain
list: each factory gets the :class:`DiscoveryOptions` and returns its entries, available
or not (with the reason).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from runtime.backends.base import Availability, Backend
from runtime.errors import UnknownRuntimeError

__all__ = ["FACTORIES", "DiscoveryOptions", "RuntimeEntry", "discover", "names_runtime", "select", "selection_names"]

#: GPU providers reported even when this onnxruntime package does not list them, so a
#: report says why they did not run.
_NOTABLE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass
class RuntimeEntry:
    """A runtime name, whether it can run here, and how to make a fresh backend for it."""

    name: str
    availability: Availability
    make: Callable[[], Backend] | None = None


@dataclass(frozen=True)
class DiscoveryOptions:
    """What the backends need to know before they are made.

    custom_op_libraries: ONNX Runtime custom-op libraries; plugin_libraries: TensorRT
    plugin libraries; openvino_precision: "f32" (default) or "engine" (the device's own
    INFERENCE_PRECISION_HINT, e.g. bf16 on CPUs with AMX/AVX512-BF16).
    """

    custom_op_libraries: tuple[str | os.PathLike[str], ...] = ()
    plugin_libraries: tuple[str | os.PathLike[str], ...] = ()
    openvino_precision: str = "f32"
    extra: dict[str, str] = field(default_factory=dict)


def _onnxruntime_entries(options: DiscoveryOptions) -> list[RuntimeEntry]:
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
                return OnnxRuntimeBackend(provider, level, options.custom_op_libraries)

            backend = make()
            entries.append(RuntimeEntry(backend.name, backend.available(), make))
    return entries


def _reference_entries(options: DiscoveryOptions) -> list[RuntimeEntry]:
    from runtime.backends.reference import ReferenceEvaluatorBackend

    reference = ReferenceEvaluatorBackend()
    return [RuntimeEntry(reference.name, reference.available(), ReferenceEvaluatorBackend)]


def _openvino_entries(options: DiscoveryOptions) -> list[RuntimeEntry]:
    from runtime.backends.openvino import OpenVINOBackend, openvino_devices

    devices, reason = openvino_devices()
    if not devices:
        return [RuntimeEntry("openvino", Availability(False, reason))]
    entries = []
    for device in devices:

        def make(device: str = device) -> Backend:
            return OpenVINOBackend(device, options.openvino_precision)

        backend = make()
        entries.append(RuntimeEntry(backend.name, backend.available(), make))
    return entries


def _tensorrt_entries(options: DiscoveryOptions) -> list[RuntimeEntry]:
    try:
        from runtime.backends.tensorrt import TensorRTBackend
    except ImportError as error:
        return [RuntimeEntry("tensorrt", Availability(False, f"the TensorRT backend does not import: {error}"))]

    def make() -> Backend:
        return TensorRTBackend(plugin_libraries=list(options.plugin_libraries))

    try:
        availability = make().available()
    except Exception as error:  # available() must not raise; report a broken backend instead
        return [RuntimeEntry("tensorrt", Availability(False, f"the TensorRT backend failed to start: {error}"))]
    return [RuntimeEntry(TensorRTBackend.name, availability, make)]


#: Every runtime family, in report order.
FACTORIES: list[Callable[[DiscoveryOptions], list[RuntimeEntry]]] = [
    _onnxruntime_entries,
    _reference_entries,
    _openvino_entries,
    _tensorrt_entries,
]


def discover(
    custom_op_libraries: Sequence[str | os.PathLike[str]] = (),
    plugin_libraries: Sequence[str | os.PathLike[str]] = (),
    openvino_precision: str = "f32",
) -> list[RuntimeEntry]:
    """Every ONNX runtime configuration known here, available or not (with the reason)."""
    options = DiscoveryOptions(tuple(custom_op_libraries), tuple(plugin_libraries), openvino_precision)
    return [entry for factory in FACTORIES for entry in factory(options)]


def names_runtime(name: str, runtime: str) -> bool:
    """Whether a name of a selection (``ort``, ``ort:cpu``, ``ort:cpu:all``) names the runtime ``runtime``: the
    same name, or a prefix of it up to a ``:``."""
    return runtime == name or runtime.startswith(name + ":")


def selection_names(spec: str | Sequence[str]) -> list[str]:
    """The names of a selection (``"ort, tensorrt"`` or a list), stripped, empty ones dropped; ``all`` included."""
    return [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]


def select(entries: Sequence[RuntimeEntry], spec: str | Sequence[str] = "all") -> list[RuntimeEntry]:
    """The entries a selection names (see the module docstring), in discovery order.

    Raises :class:`UnknownRuntimeError` listing the known and the available names when a
    name matches nothing, or when the selection is empty.
    """
    names = selection_names(spec)
    known = [e.name for e in entries]
    available = [e.name for e in entries if e.availability.ok]
    if not names:
        raise UnknownRuntimeError(
            f"no runtime named (got {spec!r}); give 'all' or names such as {', '.join(available[:3]) or 'reference'}"
        )
    if set(names) == {"all"}:
        return list(entries)
    if "all" in names:
        raise UnknownRuntimeError(
            f"'all' cannot be combined with other runtime names (got {spec!r}): give 'all' alone, or the names"
        )
    chosen: list[RuntimeEntry] = []
    for name in names:
        matches = [e for e in entries if names_runtime(name, e.name)]
        if not matches:
            raise UnknownRuntimeError(
                f"unknown runtime {name!r}. Available here: {', '.join(available) or 'none'}; "
                f"known: {', '.join(known)}; or 'all', or a prefix such as 'ort', 'ort:cpu' or 'openvino'"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return [e for e in entries if e in chosen]
