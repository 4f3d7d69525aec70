"""The TensorRT plugin for ``ai.bkn::BatchKalmanNorm``, seen from Python.

One job: tie the C++ plugin in ``plugins/tensorrt/`` to the op contract in
:mod:`bkn_export.export.op.op_spec`.

* :func:`plugin_fields` — the plugin's fields, which are the op's attributes (same
  names, same order); the ONNX parser hands every node attribute whose name is a
  plugin field to the plugin creator.
* :func:`render_fields_header` — the C++ declarations (``BatchKalmanNormFields.h``)
  generated from ``op_spec``; ``plugins/tensorrt/gen_fields.py`` writes them and a
  test checks that the committed header equals this rendering.
* :func:`find_plugin_library` — where the built shared library is
  (argument, ``BKN_TENSORRT_PLUGIN``, or the default build folders).
* :func:`prepare_model_for_plugin` — the copy of an exported model that TensorRT's
  ONNX parser must see so that every ``BatchKalmanNorm`` node becomes the plugin.

How TensorRT's ONNX parser chooses between the plugin and the node's model-local
function body (which the training export adds for ONNX Runtime); read in
onnx/onnx-tensorrt ``ModelImporter.cpp``:

* Current sources (with ``kENABLE_PLUGIN_OVERRIDE``, new in 10.15), ``parseNode``: if the parser flag
  ``kENABLE_PLUGIN_OVERRIDE`` is set *or the node has a* ``plugin_namespace``
  *attribute*, and ``isNodeInPluginRegistry`` finds a creator for (op type,
  ``plugin_version`` [default "1"], ``plugin_namespace`` [default ""]), the node goes
  to ``FallbackPluginImporter`` (the plugin). Otherwise: a built-in importer of that
  op type, else a model-local function of that name (``LocalFunctionImporter``),
  else ``FallbackPluginImporter``. ``parseNodeStaticCheck`` likewise lets a registered
  plugin take precedence over a local function.
* TensorRT 10.0/10.1 (branch 10.1-GA, ``ModelImporter.cpp`` ``parseNode`` and ``parseNodeStaticCheck``): built-in
  importer, else local function, else plugin — the function body wins. (Versions in
  between were not read.)

Our nodes carry ``plugin_namespace`` = :data:`op_spec.PLUGIN_NAMESPACE`, which selects
the plugin on current parsers once the library is loaded; :func:`prepare_model_for_plugin`
also drops the op's local function so that no parser version can fall back to it
(``BatchKalmanNorm`` is not a built-in importer, so the plugin is the only path left,
and a missing plugin fails the parse loudly instead of running the function body).

Nothing here imports TensorRT.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from bkn_export.errors import PluginLibraryNotFoundError, RuntimeLoadError
from bkn_export.export.op import op_spec

__all__ = [
    "DYNAMIC_LIBRARY_NAME",
    "PLUGIN_LIBRARY_ENV",
    "PLUGIN_SOURCE_DIR",
    "STATIC_LIBRARY_NAME",
    "PluginField",
    "find_plugin_library",
    "plugin_fields",
    "plugin_nodes",
    "prepare_model_for_plugin",
    "render_fields_header",
]

#: Loaded through ``IPluginRegistry::loadLibrary`` / ``trtexec --dynamicPlugins``
#: (exports ``getCreators`` and ``setLoggerFinder``).
DYNAMIC_LIBRARY_NAME = "libbkn_tensorrt_plugin.so"
#: Registers its creator when dlopen'ed (a static registrar, as ``REGISTER_TENSORRT_PLUGIN``)
#: (``trtexec --staticPlugins``, ``ctypes.CDLL``, linking into an application).
STATIC_LIBRARY_NAME = "libbkn_tensorrt_plugin_static.so"
#: Environment variable naming the plugin library (a file) to load.
PLUGIN_LIBRARY_ENV = "BKN_TENSORRT_PLUGIN"
#: The plugin's sources (present in a source checkout, not in an installed wheel).
PLUGIN_SOURCE_DIR = Path(__file__).resolve().parent.parent / "plugins" / "tensorrt"

#: TensorRT's ``PluginFieldType`` name for each op attribute kind.
_FIELD_TYPE = {"float": "kFLOAT32", "string": "kCHAR"}


@dataclass(frozen=True)
class PluginField:
    """One plugin field: its name (= the op attribute's), TensorRT type, default."""

    name: str
    field_type: str  # "kFLOAT32" | "kCHAR" (nvinfer1::PluginFieldType)
    default: float | str
    doc: str


def plugin_fields() -> tuple[PluginField, ...]:
    """The plugin's fields: one per attribute of :data:`op_spec.ATTRIBUTES`, in order."""
    fields = []
    for attribute in op_spec.ATTRIBUTES:
        if attribute.kind not in _FIELD_TYPE:
            raise ValueError(f"op_spec attribute {attribute.name!r} has kind {attribute.kind!r}; no plugin field type")
        fields.append(PluginField(attribute.name, _FIELD_TYPE[attribute.kind], attribute.default, attribute.doc))
    return tuple(fields)


def _constant_name(name: str) -> str:
    """``prior_mean`` -> ``PRIOR_MEAN``; ``X`` -> ``X``."""
    return name.upper()


def _cpp_string(value: str) -> str:
    if any(c in value for c in '"\\\n'):
        raise ValueError(f"cannot emit {value!r} as a plain C++ string literal")
    return f'"{value}"'


def _cpp_float(value: float | str) -> str:
    text = repr(float(value))
    return text + "F" if ("." in text or "e" in text) else text + ".0F"


def render_fields_header() -> str:
    """The text of ``plugins/tensorrt/BatchKalmanNormFields.h``, generated from ``op_spec``."""
    lines = [
        "// Generated by plugins/tensorrt/gen_fields.py from bkn_export/export/op/op_spec.py. Do not edit.",
        "// Regenerate: python plugins/tensorrt/gen_fields.py  (tests/test_tensorrt_plugin.py checks it is current)",
        "#ifndef BKN_BATCH_KALMAN_NORM_FIELDS_H",
        "#define BKN_BATCH_KALMAN_NORM_FIELDS_H",
        "",
        "#include <cstdint>",
        "",
        "namespace bkn",
        "{",
        "namespace fields",
        "{",
        "",
        "// Registered name/version/namespace; the ONNX parser looks the creator up by the node's",
        "// op type and its plugin_version / plugin_namespace attributes.",
        f"constexpr char const* kPLUGIN_NAME = {_cpp_string(op_spec.PLUGIN_NAME)};",
        f"constexpr char const* kPLUGIN_VERSION = {_cpp_string(op_spec.PLUGIN_VERSION)};",
        f"constexpr char const* kPLUGIN_NAMESPACE = {_cpp_string(op_spec.PLUGIN_NAMESPACE)};",
        f"constexpr char const* kONNX_DOMAIN = {_cpp_string(op_spec.DOMAIN)};",
        f"constexpr int32_t kONNX_DOMAIN_VERSION = {int(op_spec.DOMAIN_VERSION)};",
        "",
        "// Inputs, in node order.",
        f"constexpr int32_t kNB_INPUTS = {len(op_spec.INPUTS)};",
    ]
    for index, port in enumerate(op_spec.INPUTS):
        lines.append(f"constexpr int32_t kINPUT_{_constant_name(port.name)} = {index}; // {port.shape}")
    names = ", ".join(_cpp_string(port.name) for port in op_spec.INPUTS)
    lines += [f"constexpr char const* kINPUT_NAMES[kNB_INPUTS] = {{{names}}};", ""]
    lines += ["// Outputs, in node order.", f"constexpr int32_t kNB_OUTPUTS = {len(op_spec.OUTPUTS)};"]
    for index, port in enumerate(op_spec.OUTPUTS):
        lines.append(f"constexpr int32_t kOUTPUT_{_constant_name(port.name)} = {index}; // {port.shape}")
    names = ", ".join(_cpp_string(port.name) for port in op_spec.OUTPUTS)
    lines += [f"constexpr char const* kOUTPUT_NAMES[kNB_OUTPUTS] = {{{names}}};", ""]

    fields = plugin_fields()
    lines += [
        "// Plugin fields = the op's attributes (same names, same order).",
        "enum class FieldKind : int32_t",
        "{",
        "    kFLOAT32 = 0, // PluginFieldType::kFLOAT32, length 1",
        "    kSTRING = 1   // PluginFieldType::kCHAR, NUL-terminated",
        "};",
        "",
        "struct FieldSpec",
        "{",
        "    char const* name;",
        "    FieldKind kind;",
        "    float floatDefault;        // kFLOAT32 fields",
        "    char const* stringDefault; // kSTRING fields",
        "};",
        "",
        f"constexpr int32_t kNB_FIELDS = {len(fields)};",
    ]
    for index, field in enumerate(fields):
        lines.append(f"constexpr int32_t kFIELD_{_constant_name(field.name)} = {index};")
    lines.append("constexpr FieldSpec kFIELDS[kNB_FIELDS] = {")
    for field in fields:
        if field.field_type == "kFLOAT32":
            default = _cpp_float(field.default)
            lines.append(f"    {{{_cpp_string(field.name)}, FieldKind::kFLOAT32, {default}, nullptr}},")
        else:
            lines.append(
                f"    {{{_cpp_string(field.name)}, FieldKind::kSTRING, 0.0F, {_cpp_string(str(field.default))}}},"
            )
    lines += [
        "};",
        "",
        "} // namespace fields",
        "} // namespace bkn",
        "",
        "#endif // BKN_BATCH_KALMAN_NORM_FIELDS_H",
        "",
    ]
    return "\n".join(lines)


def _default_build_dirs() -> list[Path]:
    return [PLUGIN_SOURCE_DIR / "build", Path.cwd() / "build" / "tensorrt"]


def find_plugin_library(path: str | os.PathLike[str] | None = None, static: bool = False) -> Path:
    """The plugin shared library to load.

    Looks at ``path`` (a file), then ``$BKN_TENSORRT_PLUGIN``, then
    ``plugins/tensorrt/build/`` and ``./build/tensorrt/``. ``static`` picks the
    self-registering library instead of the ``loadLibrary`` one. Raises
    :class:`PluginLibraryNotFoundError` naming every place looked at.
    """
    name = STATIC_LIBRARY_NAME if static else DYNAMIC_LIBRARY_NAME
    looked: list[str] = []
    if path is not None:
        candidate = Path(path)
        if candidate.is_file():
            return candidate
        raise PluginLibraryNotFoundError(
            f"TensorRT plugin library {candidate} does not exist; build it with "
            f"`cmake -S {_plugin_sources()} -B build/tensorrt && cmake --build build/tensorrt` "
            "(see plugins/tensorrt/README.md)"
        )
    from_env = os.environ.get(PLUGIN_LIBRARY_ENV)
    if from_env:
        candidate = Path(from_env)
        if candidate.is_file():
            return candidate
        looked.append(f"${PLUGIN_LIBRARY_ENV}={from_env} (not a file)")
    for directory in _default_build_dirs():
        candidate = directory / name
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    raise PluginLibraryNotFoundError(
        f"TensorRT plugin library {name} not found (looked at: {'; '.join(looked)}). Build it from "
        f"{_plugin_sources()} as its README.md describes, and pass its path or set ${PLUGIN_LIBRARY_ENV}."
    )


def _plugin_sources() -> str:
    """Where the plugin's sources are: beside the package in a checkout; in the source distribution's
    ``plugins/tensorrt`` where the package was installed from a wheel (which holds no C++ sources)."""
    if PLUGIN_SOURCE_DIR.is_dir():
        return str(PLUGIN_SOURCE_DIR)
    return "plugins/tensorrt of the bkn-export source distribution or repository (not in the installed wheel)"


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, including those in subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _walk_nodes(subgraph)


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``ai.bkn::BatchKalmanNorm`` nodes of ``model`` (main graph and subgraphs)."""
    return [node for node in _walk_nodes(model.graph) if op_spec.is_op_node(node)]


def prepare_model_for_plugin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` on which TensorRT's ONNX parser can only pick the plugin.

    * Every BatchKalmanNorm node gets ``plugin_version`` / ``plugin_namespace`` equal to
      the plugin's registered version and namespace when it lacks them; a node that asks
      for a different one raises :class:`RuntimeLoadError` naming the node.
    * The op's model-local function (``ai.bkn`` / ``BatchKalmanNorm``) is removed.

    ``model`` itself is not modified.
    """
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    expected = {"plugin_version": op_spec.PLUGIN_VERSION, "plugin_namespace": op_spec.PLUGIN_NAMESPACE}
    for node in plugin_nodes(prepared):
        present = {a.name: a for a in node.attribute}
        for name, value in expected.items():
            if name not in present:
                node.attribute.append(onnx.helper.make_attribute(name, value))
                continue
            found = onnx.helper.get_attribute_value(present[name])
            found = found.decode() if isinstance(found, bytes) else found
            if found != value:
                raise RuntimeLoadError(
                    f"node {node.name!r} ({op_spec.DOMAIN}::{op_spec.OP_TYPE}) has {name}={found!r}, but the "
                    f"TensorRT plugin registers {value!r}; re-export the model with this bkn_export version or "
                    f"build the plugin that matches it"
                )
    kept = [f for f in prepared.functions if not op_spec.is_op_function(f)]
    del prepared.functions[:]
    prepared.functions.extend(kept)
    return prepared
