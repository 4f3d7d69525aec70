"""PyTorch eager: the reference every other runtime is compared with.

``mode="inference"`` runs the model in eval mode. ``mode="training"`` runs what the
training-mode export computes: on a deep copy of the model, every module in eval mode
except the BKN layers, which run in train mode (batch statistics and the Kalman chain).
So Dropout, drop-path, an unconverted BatchNorm and any other module with its own
train-mode behaviour act as in eval mode, exactly as in the exported graph; the user's
model (modes and running statistics) never changes and every call starts from the same
state.
Inputs are matched to ``forward``'s parameters by ONNX input name when every ONNX input
names one (an argument the exporter dropped keeps its default, or gets None, with a
note), else by position; floating inputs are cast to the model's parameter dtype. The
flattened PyTorch outputs (tensors and Python numbers; a None is no output, as in the export) are matched to
``output_names`` in order: the order the export recorded (``bkn_export.output_order``, so outputs reordered or
removed later pair by name), else the graph's (:func:`runtime.model_io.returned_output_order`).

``run_capturing`` also records every module's output through forward hooks, for the
localisation (:mod:`runtime.localize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime._bkn import copy_model, kept_modes
from runtime.backends.base import Availability, Backend

__all__ = ["ModuleCapture", "TorchEagerBackend", "array_of", "tensor_of"]


@dataclass
class ModuleCapture:
    """Module outputs of one forward pass.

    outputs: module name -> its tensor outputs (first call), as NumPy arrays copied when
    the hook ran (:func:`_snapshot`): a later in-place op (``nn.ReLU(inplace=True)`` after a
    normalization, ``x += shortcut``) must not rewrite what the module returned;
    order: module names in the order their forward finished; calls: how often each ran.
    """

    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    #: module name -> its tensor inputs (first call), copied before its forward ran (an in-place module
    #: overwrites its input).
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: Each further name of a module registered under several names -> the name it is recorded under (the
    #: first, as ``named_modules()`` gives it); the exporter's scopes may use any of them.
    aliases: dict[str, str] = field(default_factory=dict)


def _tensor_leaves(value: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _output_leaves(value: Any) -> list[np.ndarray]:
    """A forward's outputs as the exporter flattens them into graph outputs: its tensors, and its Python numbers (a
    size read from an input, ``x.shape[0]``, is a scalar graph output) as 0-d arrays (int64, float64, bool); a None
    is dropped, as the exporter drops it. Each a copy (:func:`_snapshot`)."""
    import torch
    from torch.utils._pytree import tree_leaves

    leaves = []
    for leaf in tree_leaves(value):
        if isinstance(leaf, (tuple, list, dict)):  # a container subclass pytree does not know; the exporter flattens it
            leaves.extend(_output_leaves(dict(leaf) if isinstance(leaf, dict) else tuple(leaf)))
        elif isinstance(leaf, torch.Tensor):
            leaves.append(_snapshot(leaf))
        elif isinstance(leaf, bool):
            leaves.append(np.array(leaf, dtype=np.bool_))
        elif isinstance(leaf, int):
            leaves.append(np.array(leaf, dtype=np.int64))
        elif isinstance(leaf, float):
            leaves.append(np.array(leaf, dtype=np.float64))
    return leaves


def array_of(tensor: Any) -> np.ndarray:
    """A CPU tensor's values as a NumPy array (sharing memory where NumPy has the dtype); bfloat16, which NumPy
    lacks, as ``ml_dtypes.bfloat16`` through float32 (exact)."""
    value = tensor.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
        import ml_dtypes

        return value.float().numpy().astype(ml_dtypes.bfloat16)  # type: ignore[no-any-return]
    return value.numpy()  # type: ignore[no-any-return]


def tensor_of(array: np.ndarray) -> Any:
    """:func:`array_of` back: a CPU tensor of ``array``'s values (``ml_dtypes.bfloat16`` as torch.bfloat16)."""
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    # a copy: a forward that changes its input in place (x.mul_(2)) must not rewrite the inputs the runtimes get
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def _snapshot(tensor: Any) -> np.ndarray:
    """A NumPy copy of ``tensor`` as it is now.

    ``Tensor.numpy()`` of a CPU tensor shares its memory, so a module output captured that
    way would later show what an in-place op wrote into it (a BatchNorm output read after
    ``ReLU(inplace=True)`` holds the ReLU's output), and localisation would blame a module
    that agrees.
    """
    return np.array(array_of(tensor), copy=True)


def _forward_parameters(model: Any) -> dict[str, bool]:
    """``forward``'s named parameters (name -> has a default); empty for ``*args`` forwards."""
    import inspect

    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default is not inspect.Parameter.empty for p in signature.parameters.values() if p.kind in kinds}


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
        #: What the reference did that a reader of the report should know (dropped arguments).
        self.notes: list[str] = []
        #: The layers the file's BatchKalmanNorm nodes came from (their exporter scopes); None where unknown.
        self.file_layers: frozenset[str] | None = None
        #: The file's graph outputs: the outputs :meth:`run` returns (``output_names`` may also name outputs the
        #: file no longer has, to pair the model's tensors by); None: every name in ``output_names``.
        self.file_outputs: frozenset[str] | None = None

    def available(self) -> Availability:
        try:
            import torch
        except ImportError as error:
            return Availability(False, f"torch does not import: {error}")
        return Availability(True, f"torch {torch.__version__}")

    def load(self, model_path: str) -> None:
        """Read the ONNX graph's input and output names to key inputs and outputs by."""
        import onnx

        from runtime.model_io import returned_output_order, tensor_specs

        graph_model = onnx.load(model_path, load_external_data=False)
        inputs, _ = tensor_specs(graph_model)
        self.input_names = [s.name for s in inputs]
        self.output_names, order_note = returned_output_order(graph_model)
        self.file_outputs = frozenset(output.name for output in graph_model.graph.output)
        if order_note is not None:
            self._note(order_note)
        self.file_layers = op_node_layers(graph_model)

    def _instance(self) -> Any:
        if self.mode == "inference":
            self.model.eval()
            return self.model
        from runtime._bkn import train_bkn_layers

        instance = copy_model(self.model)
        # Only the BKN layers themselves: their children (a norm-act's Dropout) stay in eval; frozen layers too.
        frozen = train_bkn_layers(instance)
        if frozen is not None:
            self._note(frozen)
        self._note_layers_without_nodes(instance)
        return instance

    def _note_layers_without_nodes(self, instance: Any) -> None:
        """A note naming the layers that train here but have no BatchKalmanNorm node in the file (exported frozen,
        in eval mode, so folded away): the reference then computes another function than the file."""
        if not self.file_layers:
            return
        from runtime._bkn import bkn_layers
        from runtime.onnx_scopes import unwrapped

        layers = bkn_layers(instance)
        aliases: dict[int, set[str]] = {}  # a layer registered under several names (MONAI's DynUNet) is any of them
        for name, module in instance.named_modules(remove_duplicate=False):
            aliases.setdefault(id(module), set()).add(name)
        known = {alias for _, layer in layers for alias in aliases.get(id(layer), ())}
        in_file = {unwrapped(name, known) for name in self.file_layers}  # the export's wrapper: model.<layer>
        missing = [name for name, layer in layers if layer.training and not aliases.get(id(layer), {name}) & in_file]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:6]) + (" ..." if len(missing) > 6 else "")
            self._note(
                f"layer(s) {shown} train in the model but have no BatchKalmanNorm node in the file: either the "
                "forward does not run them (a layer registered but never called, a branch only other inputs take, or "
                "one the model takes only when it is itself in train mode, `if self.training:`, which the training "
                "export's eval-mode forward does not take), and the file does not compute them at all; or they were "
                "exported frozen (in eval mode) and the file computes them with their running statistics (put them in "
                "eval mode in the model, model.get_submodule(name).eval(), to compare what the file computes)"
            )

    def _arguments(
        self, model: Any, inputs: Mapping[str, np.ndarray], narrowing: bool = False
    ) -> tuple[list[Any], dict[str, Any]]:
        """PyTorch arguments for the ONNX inputs: by name where they match ``forward``'s parameters, else by position.

        Floating inputs narrower than the model's floating parameter dtype are cast to it at the boundary (a
        float16 ONNX input feeds a float32 model the same values, exactly); wider ones (a float64 timestamp the
        model computes in float64) keep the file's dtype, so that PyTorch sees the values the runtimes see, unless
        ``narrowing`` (:meth:`_forward`'s retry where the model refuses them, with a note). A ``forward``
        parameter the exporter dropped (not an ONNX input) keeps its default, or gets
        None when it has none; either way it is noted in :attr:`notes`.
        """
        import torch

        names = [name for name in self.input_names if name in inputs] or list(inputs)
        parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else None

        def tensor(name: str) -> Any:
            value = tensor_of(inputs[name]).to(device)
            if dtype is None or not value.is_floating_point():
                return value
            return value.to(dtype) if narrowing or _widens(value.dtype, dtype) else value

        parameters = _forward_parameters(model)
        if not parameters or not all(name in parameters for name in names):
            return [tensor(name) for name in names], {}
        kwargs = {name: tensor(name) for name in names}
        forward_order = [name for name in parameters if name in kwargs]
        if forward_order != names:
            self._note(
                f"the file's inputs {names} are bound to forward's parameters by name, not by position (forward takes "
                f"them as {forward_order}): where the exporter named positional inputs in another order "
                "(torch.onnx.export's input_names), every output differs; name them as forward's parameters"
            )
        for name, has_default in parameters.items():
            if name in kwargs:
                continue
            if has_default:
                self._note(
                    f"forward argument {name!r} is not an ONNX input (dropped by the exporter): its default used"
                )
            else:
                kwargs[name] = None
                self._note(f"forward argument {name!r} is not an ONNX input (dropped by the exporter): passed None")
        return [], kwargs

    def _wider_inputs(self, model: Any, inputs: Mapping[str, np.ndarray]) -> list[str]:
        """The floating inputs that :meth:`_arguments` passes wider than the model's floating parameters, with
        their dtypes (``name (float64)``)."""
        parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
        if parameter is None:
            return []
        wider = []
        for name, array in inputs.items():
            dtype = tensor_of(array).dtype
            if dtype.is_floating_point and not _widens(dtype, parameter.dtype) and dtype != parameter.dtype:
                wider.append(f"{name} ({str(dtype).removeprefix('torch.')})")
        return wider

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _forward(self, model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        statistics_in, statistics_out = self._running_statistics(model, inputs)
        with torch.no_grad():
            for name, buffer in statistics_in.items():
                buffer.copy_(tensor_of(inputs[name]).to(buffer))
        feeds = {k: v for k, v in inputs.items() if k not in statistics_in}
        args, kwargs = self._arguments(model, feeds)
        wider = self._wider_inputs(model, feeds)  # the only inputs a retry changes: state kept for it alone
        kept = {name: buffer.clone() for name, buffer in model.named_buffers()} if wider and statistics_in else {}
        try:
            with torch.no_grad():
                result = model(*args, **kwargs)
        except (RuntimeError, TypeError) as error:
            if not wider:
                raise
            with torch.no_grad():  # a training step may have updated statistics before it failed
                for name, buffer in model.named_buffers():
                    if name in kept:
                        buffer.copy_(kept[name])
                for name, buffer in statistics_in.items():
                    buffer.copy_(tensor_of(inputs[name]).to(buffer))
                args, kwargs = self._arguments(model, feeds, narrowing=True)
                result = model(*args, **kwargs)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self._note(
                f"the PyTorch model refuses the file's wider floating inputs {wider} ({reason}): they were rounded "
                "to its parameters' dtype for the reference, which therefore saw other values than the runtimes; "
                "differences of that rounding's size are not the file's"
            )
        leaves = _output_leaves(result)
        output_names = [n for n in self.output_names if n not in statistics_out] or [
            f"output_{i}" for i in range(len(leaves))
        ]
        if len(leaves) > len(output_names):
            from runtime.errors import BKNInputError

            raise BKNInputError(
                f"the PyTorch model returns {len(leaves)} tensors but the ONNX graph has {len(output_names)} "
                f"outputs {output_names}: the model and the ONNX file do not belong together"
            )
        # ONNX may have more outputs (e.g. exposed posteriors): those have no PyTorch counterpart
        # and are left out; fewer would be a wrong model/ONNX pairing. Updated running statistics
        # are the layers' buffers after the step.
        outputs = dict(zip(output_names, leaves))
        outputs.update(
            {name: _snapshot(buffer) for name, buffer in statistics_out.items() if name in self.output_names}
        )
        if self.file_outputs is not None:
            outputs = {name: array for name, array in outputs.items() if name in self.file_outputs}
        return outputs

    def _running_statistics(
        self, model: Any, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A training-mode file's running-statistics inputs and outputs (``running_stats_io=True``),
        as buffers of ``model`` (:func:`runtime._bkn.running_statistics_io`); none in inference mode."""
        if self.mode != "training":
            return {}, {}
        from runtime._bkn import running_statistics_io

        return running_statistics_io(model, list(inputs))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with kept_modes(self.model):
            return self._forward(self._instance(), inputs)

    def run_capturing(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], ModuleCapture]:
        """Run once with forward hooks on every named module; returns (outputs, capture)."""
        with kept_modes(self.model):
            return self._run_capturing(self._instance(), inputs)

    def _run_capturing(
        self, model: Any, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], ModuleCapture]:
        capture = ModuleCapture()
        first_names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            canonical = first_names.setdefault(id(module), name)
            if name and canonical != name:
                capture.aliases[name] = canonical
        handles = []
        for module_name, module in model.named_modules():
            if not module_name:
                continue

            def hook(_module: Any, _inputs: Any, output: Any, _name: str = module_name) -> None:
                capture.calls[_name] = capture.calls.get(_name, 0) + 1
                if _name in capture.outputs:
                    return
                capture.order.append(_name)
                capture.outputs[_name] = [_snapshot(t) for t in _tensor_leaves(output)]

            def pre_hook(_module: Any, args: Any, _name: str = module_name) -> None:
                if _name not in capture.inputs:
                    capture.inputs[_name] = [_snapshot(t) for t in _tensor_leaves(args)]

            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
        try:
            outputs = self._forward(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return outputs, capture


def op_node_layers(graph_model: Any) -> frozenset[str] | None:
    """The innermost exporter scope of each ``ai.bkn::BatchKalmanNorm`` node (its layer); None where the file has no
    such node or one without scopes (another exporter)."""
    from runtime._bkn import is_op_node
    from runtime.onnx_scopes import node_scope

    layers = set()
    for node in graph_model.graph.node:
        if not is_op_node(node):
            continue
        scope = node_scope(node)
        if not scope:
            return None
        layers.add(scope[-1])
    return frozenset(layers) or None


def _widens(source: Any, target: Any) -> bool:
    """Whether every value of float dtype ``source`` is exactly a value of ``target`` (float16 / bfloat16 → float32,
    anything → float64; equal dtypes count)."""
    import torch

    if source == target or target == torch.float64:
        return True
    return target == torch.float32 and source in (torch.float16, torch.bfloat16)
