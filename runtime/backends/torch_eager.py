"""PyTorch eager: the reference every other runtime is compared with.

``mode="inference"`` runs the model in eval mode; ``mode="training"`` runs the
train-mode forward (batch statistics and the Kalman chain) on a deep copy, so the
user's running statistics never change and every call starts from the same state.
Inputs are matched to the ONNX graph inputs by position and the flattened PyTorch
outputs to the ONNX graph outputs by position (as ``torch.onnx.export`` orders them).

``run_capturing`` also records every module's output through forward hooks, for the
localisation (:mod:`runtime.localize`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.backends.base import Availability, Backend

__all__ = ["ModuleCapture", "TorchEagerBackend"]


@dataclass
class ModuleCapture:
    """Module outputs of one forward pass.

    outputs: module name -> its tensor outputs (first call), as NumPy arrays;
    order: module names in the order their forward finished; calls: how often each ran.
    """

    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)


def _tensor_leaves(value: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


class TorchEagerBackend(Backend):
    """``pytorch``: the model itself, eager, on CPU (or wherever its parameters live)."""

    name = "pytorch"

    def __init__(self, model: Any, mode: str = "inference") -> None:
        if mode not in ("inference", "training"):
            raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")
        self.model = model
        self.mode = mode
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def available(self) -> Availability:
        try:
            import torch
        except ImportError as error:
            return Availability(False, f"torch does not import: {error}")
        return Availability(True, f"torch {torch.__version__}")

    def load(self, model_path: str) -> None:
        """Read the ONNX graph's input and output names to key inputs and outputs by."""
        import onnx

        from runtime.model_io import tensor_specs

        inputs, outputs = tensor_specs(onnx.load(model_path, load_external_data=False))
        self.input_names = [s.name for s in inputs]
        self.output_names = [s.name for s in outputs]

    def _instance(self) -> Any:
        if self.mode == "inference":
            self.model.eval()
            return self.model
        instance = copy.deepcopy(self.model)
        instance.train()
        return instance

    def _forward(self, model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        names = self.input_names or list(inputs)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device) for name in names]
        with torch.no_grad():
            result = model(*args)
        leaves = [t.detach().cpu().numpy() for t in _tensor_leaves(result)]
        output_names = self.output_names or [f"output_{i}" for i in range(len(leaves))]
        if len(leaves) > len(output_names):
            from bkn_export.errors import BKNInputError

            raise BKNInputError(
                f"the PyTorch model returns {len(leaves)} tensors but the ONNX graph has {len(output_names)} "
                f"outputs {output_names}: the model and the ONNX file do not belong together"
            )
        # ONNX may have more outputs (e.g. running statistics as graph outputs): those have no
        # PyTorch counterpart and are left out; fewer would be a wrong model/ONNX pairing.
        return dict(zip(output_names, leaves))

    @contextlib.contextmanager
    def _modes_kept(self) -> Iterator[None]:
        """Leave every module of the user's model in the train/eval mode it was found in."""
        was_training = {m: m.training for m in self.model.modules()}
        try:
            yield
        finally:
            for module, training in was_training.items():
                module.training = training

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._modes_kept():
            return self._forward(self._instance(), inputs)

    def run_capturing(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], ModuleCapture]:
        """Run once with forward hooks on every named module; returns (outputs, capture)."""
        with self._modes_kept():
            return self._run_capturing(self._instance(), inputs)

    def _run_capturing(
        self, model: Any, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], ModuleCapture]:
        capture = ModuleCapture()
        handles = []
        for module_name, module in model.named_modules():
            if not module_name:
                continue

            def hook(_module: Any, _inputs: Any, output: Any, _name: str = module_name) -> None:
                capture.calls[_name] = capture.calls.get(_name, 0) + 1
                if _name in capture.outputs:
                    return
                capture.order.append(_name)
                capture.outputs[_name] = [t.detach().cpu().numpy() for t in _tensor_leaves(output)]

            handles.append(module.register_forward_hook(hook))
        try:
            outputs = self._forward(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return outputs, capture
