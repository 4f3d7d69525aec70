"""Registration of the ``onnx.defs.OpSchema`` for ``ai.bkn::BatchKalmanNorm`` (from op_spec).

The dynamo exporter emits a custom-domain node only for an op whose schema is
registered (onnxscript looks the schema up to build the call); the checker validates
nodes against it; its shape-inference function (below) gives ``infer_shapes`` the
output types and shapes. Registration is per process and idempotent.
"""

from __future__ import annotations

import threading

import onnx
from onnx import defs, shape_inference

from bkn_export.export.op import op_spec

__all__ = ["build_schema", "is_registered", "register_schema"]

_LOCK = threading.Lock()

_ATTRIBUTE_TYPES = {"float": defs.OpSchema.AttrType.FLOAT, "string": defs.OpSchema.AttrType.STRING}


def build_schema() -> defs.OpSchema:
    """The OpSchema: inputs, outputs, attributes (with defaults), type constraints, doc."""
    schema = defs.OpSchema(
        op_spec.OP_TYPE,
        op_spec.DOMAIN,
        op_spec.DOMAIN_VERSION,
        op_spec.DOC,
        inputs=[defs.OpSchema.FormalParameter(p.name, p.type_var, p.doc) for p in op_spec.INPUTS],
        outputs=[defs.OpSchema.FormalParameter(p.name, p.type_var, p.doc) for p in op_spec.OUTPUTS],
        type_constraints=[(name, list(types), doc) for name, (types, doc) in op_spec.TYPE_CONSTRAINTS.items()],
        attributes=[
            defs.OpSchema.Attribute(a.name, onnx.helper.make_attribute(a.name, a.default), a.doc)
            for a in op_spec.ATTRIBUTES
        ],
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def _infer(ctx: shape_inference.InferenceContext) -> None:
    """Y: type and shape of X; posterior_mean, posterior_variance: type of prior_mean, shape (C,).

    C is X's dim 1 when known, else prior_mean's shape.
    """
    x_type = ctx.get_input_type(0)
    prior_type = ctx.get_input_type(1)
    if x_type is not None and x_type.HasField("tensor_type"):
        ctx.set_output_type(0, x_type)
    if prior_type is None or not prior_type.HasField("tensor_type"):
        return
    statistics = onnx.TypeProto()
    statistics.tensor_type.elem_type = prior_type.tensor_type.elem_type
    channel = onnx.TensorShapeProto.Dimension()
    x_tensor = x_type.tensor_type if x_type is not None and x_type.HasField("tensor_type") else None
    if x_tensor is not None and x_tensor.HasField("shape") and len(x_tensor.shape.dim) >= 2:
        channel.CopyFrom(x_tensor.shape.dim[1])
    elif prior_type.tensor_type.HasField("shape") and len(prior_type.tensor_type.shape.dim) == 1:
        channel.CopyFrom(prior_type.tensor_type.shape.dim[0])
    statistics.tensor_type.shape.dim.append(channel)
    if channel.HasField("dim_value"):
        for index, port in enumerate(op_spec.INPUTS[1:], start=1):
            port_type = ctx.get_input_type(index)
            if port_type is None or not port_type.tensor_type.HasField("shape"):
                continue
            dims = port_type.tensor_type.shape.dim
            if len(dims) != 1 or (dims[0].HasField("dim_value") and dims[0].dim_value != channel.dim_value):
                shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
                raise shape_inference.InferenceError(
                    f"{ctx.get_display_name()}: input '{port.name}' has "
                    f"shape {shape} but X has {channel.dim_value} channels (dim 1); every per-channel input must be "
                    f"({channel.dim_value},). In an exported chain this means a transition maps the wrong channel "
                    "count: re-wire the model (bkn_export.wire_chain) and export again"
                )
    ctx.set_output_type(1, statistics)
    ctx.set_output_type(2, statistics)


def is_registered() -> bool:
    """Whether this process has a schema for the op (ours or another registration)."""
    try:
        defs.get_schema(op_spec.OP_TYPE, op_spec.DOMAIN_VERSION, op_spec.DOMAIN)
    except defs.SchemaError:
        return False
    return True


def register_schema() -> None:
    """Register the op's schema once per process (safe to call any number of times)."""
    with _LOCK:
        if not is_registered():
            defs.register_schema(build_schema())
