"""The contract of the ONNX op ``ai.bkn::BatchKalmanNorm``, in one place.

* :mod:`~bkn_export.export.op.op_spec`: the one declaration (domain, inputs, outputs,
  attributes, opsets, the TensorRT plugin's identity); everything below is derived from it.
* :mod:`~bkn_export.export.op.schema`: the ``onnx.defs.OpSchema`` and its shape inference.
* :mod:`~bkn_export.export.op.function_body`: the ONNX function body (onnxscript) that
  ONNX Runtime and ``onnx.reference`` run when no plugin takes the node over.
* :mod:`~bkn_export.export.op.translation`: ``torch.ops.bkn.batch_kalman_norm`` → one node,
  the ``custom_translation_table`` of the training-mode export.

``runtime`` reads this contract (through ``runtime/_bkn.py``). Importing this package
imports nothing; ``op_spec`` imports neither torch nor onnx.
"""
