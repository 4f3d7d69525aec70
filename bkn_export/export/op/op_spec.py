"""The contract of the ONNX op ``ai.bkn::BatchKalmanNorm`` — one declaration.

The ONNX schema registration, the onnxscript function body, the operator doc
(``docs/ops/BatchKalmanNorm.md``) and the TensorRT plugin's name, version, namespace
and fields are all derived from (and tested against) this module.

The op is one BKN step after the prediction (see :mod:`bkn_export.functional`):
batch statistics of X, the Kalman update with the given prior, and normalization.
The prediction (transition) is ordinary ONNX ops before the node, so the chain is
explicit in the graph: node k's posterior outputs feed node k+1's prior through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkn_export.errors import ExportError

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_OPSET",
    "DOC",
    "DOMAIN",
    "DOMAIN_VERSION",
    "INPUTS",
    "MAX_OPSET",
    "MIN_OPSET",
    "OP_TYPE",
    "OUTPUTS",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "TYPE_CONSTRAINTS",
    "Attribute",
    "Port",
    "attribute_defaults",
    "check_opset",
    "is_op_function",
    "is_op_node",
]

DOMAIN = "ai.bkn"
DOMAIN_VERSION = 1
OP_TYPE = "BatchKalmanNorm"
#: The TensorRT plugin registers under the op type, so the ONNX parser maps nodes to it.
PLUGIN_NAME = OP_TYPE
#: The plugin's own version (a string in TensorRT), carried by the node's
#: ``plugin_version`` attribute; independent of DOMAIN_VERSION.
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "bkn"
#: The dynamo exporter needs opset >= 18; 23 is the newest the tested stack emits.
MIN_OPSET = 18
MAX_OPSET = 23
#: What both exporters use when no opset is given: what torch 2.13's exporter emits natively.
DEFAULT_OPSET = 20


def is_op_node(node: Any) -> bool:
    """Whether an ONNX NodeProto is an ``ai.bkn::BatchKalmanNorm`` node."""
    return bool(node.domain == DOMAIN and node.op_type == OP_TYPE)


def is_op_function(function: Any) -> bool:
    """Whether an ONNX FunctionProto is the body of ``ai.bkn::BatchKalmanNorm``."""
    return bool(function.domain == DOMAIN and function.name == OP_TYPE)


@dataclass(frozen=True)
class Port:
    """One input or output: name, type variable, shape, meaning."""

    name: str
    type_var: str
    shape: str
    doc: str


@dataclass(frozen=True)
class Attribute:
    """One node attribute: name, ONNX type ('float' | 'string'), default, meaning."""

    name: str
    kind: str
    default: float | str
    doc: str


INPUTS: tuple[Port, ...] = (
    Port("X", "T", "(N, C, D1, ..., Dk)", "input; statistics are per channel (dim 1) over all other dims"),
    Port("prior_mean", "U", "(C,)", "predicted mean μ_{k|k-1}"),
    Port("prior_variance", "U", "(C,)", "predicted variance Σ_{k|k-1} (≥ 0)"),
    Port("prior_weight", "U", "(C,)", "weight p on the prior, in [0, 1); 0 gives BatchNormalization"),
    Port("scale", "U", "(C,)", "γ"),
    Port("B", "U", "(C,)", "β"),
)

OUTPUTS: tuple[Port, ...] = (
    Port("Y", "T", "same as X", "γ (X - μ_{k|k}) / sqrt(Σ_{k|k} + epsilon) + β"),
    Port("posterior_mean", "U", "(C,)", "μ_{k|k} = p μ_{k|k-1} + (1 - p) mean(X)"),
    Port(
        "posterior_variance",
        "U",
        "(C,)",
        "Σ_{k|k} = p Σ_{k|k-1} + (1 - p) var(X) + p (1 - p) (mean(X) - μ_{k|k-1})²",
    ),
)

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("epsilon", "float", 1e-5, "added to the posterior variance before the square root"),
    Attribute(
        "fallback_ratio",
        "float",
        0.0,
        "if > 0 and mean(prior_variance / var(X)) ≥ fallback_ratio, p is taken as 0 (batch statistics only)",
    ),
    Attribute("plugin_version", "string", PLUGIN_VERSION, "TensorRT plugin version (read by TensorRT's ONNX parser)"),
    Attribute(
        "plugin_namespace", "string", PLUGIN_NAMESPACE, "TensorRT plugin namespace (read by TensorRT's ONNX parser)"
    ),
)

#: Type variables: T is the data type, U the statistics type (float32 for half types).
TYPE_CONSTRAINTS: dict[str, tuple[tuple[str, ...], str]] = {
    "T": (("tensor(double)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"), "input and output data"),
    "U": (("tensor(double)", "tensor(float)"), "statistics: float for float/float16/bfloat16 X, double for double X"),
}

#: One-paragraph description: the schema's doc string and the operator doc's summary.
DOC = (
    "One step of Batch Kalman Normalization after the prediction: the per-channel batch "
    "statistics of X (mean and biased variance over every dim but 1, accumulated in U), "
    "the Kalman update of the prior (prior_mean, prior_variance) with weight prior_weight "
    "on the prior, and the normalization of X with the posterior. With prior_weight = 0 "
    "the op is BatchNormalization in training mode (batch statistics)."
)


def check_opset(opset: int) -> None:
    """Raise :class:`ExportError` unless ``opset`` is a default-domain opset the op supports."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"{DOMAIN}::{OP_TYPE} is defined for ONNX opsets {MIN_OPSET}..{MAX_OPSET}, got opset {opset}; "
            f"pass opset=None (default) or a value in that range"
        )


def attribute_defaults() -> dict[str, float | str]:
    """Attribute name -> default value, in declaration order."""
    return {attribute.name: attribute.default for attribute in ATTRIBUTES}
