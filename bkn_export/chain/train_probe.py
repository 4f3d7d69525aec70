"""Modules a model's forward runs in one mode only, which the eval-mode recording cannot see as they run in training.

:func:`bkn_export.chain.record.record_dataflow` records the data flow of one **eval-mode** forward (no statistic
changes, no randomness). A step the forward runs only in training (``if self.training: h = self.augment(h)``)
between two normalizations is then not in the prior, and a step it runs only in eval mode is. Where such a step is a
module, :func:`mode_only_modules` finds it by running the example once in each mode with a pre-hook on every module
and comparing which modules ran, so that wiring can warn, naming those that run before a normalization. The probe
changes nothing: both forwards run on a copy of the model without its forward hooks, without gradients, and the
global random number generators are restored afterwards. A forward that fails in train mode (a detection model that
wants targets, a batch of one value per channel) is not checked. Functional code under ``if self.training:`` (no
module of its own) is not seen.
"""

from __future__ import annotations

import contextlib
import random
import sys
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from bkn_export.chain.record import is_normalization
from bkn_export.copying import copy_module
from bkn_export.module_modes import call_example, copied, kept_modes

__all__ = ["ModeOnlyModules", "mode_only_modules", "train_only_modules"]


class ModeOnlyModules(NamedTuple):
    """Modules one forward runs in one mode only, before a normalization layer that runs in both (outermost first,
    their submodules left out)."""

    train: list[str]
    eval: list[str]


def mode_only_modules(model: nn.Module, example_inputs: Any) -> ModeOnlyModules:
    """The modules ``model``'s forward on ``example_inputs`` runs in train mode but not in eval mode (left out of the
    eval-mode wiring's prior) and in eval mode but not in train mode (in the prior, never run in training), each
    only where a normalization that runs in both modes comes after it (so that it may lie on a prior's path; an
    auxiliary head after the last normalization does not). Empty where the train-mode forward fails or the model
    cannot be copied. The forwards run on a copy of the model (:func:`bkn_export.copying.copy_module`) without its
    forward hooks: the model's parameters, buffers and its modules' own state (a feature store, a counter, a
    hook's) see nothing of them."""
    none = ModeOnlyModules([], [])
    try:
        probe = copy_module(model)
    except Exception:  # a model deepcopy refuses: not checked
        return none
    for module in probe.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    in_eval = _modules_run(probe, example_inputs, False)
    in_train = _modules_run(probe, example_inputs, True)
    if in_eval is None or in_train is None:
        return none
    modules = dict(probe.named_modules())
    both = set(in_eval) & set(in_train)
    normalizations = [name for name in both if is_normalization(modules[name])]
    # Not named: dropout (the prior takes it as the identity in both modes anyway), and a module that holds a
    # normalization (a block that stochastic depth skips at random in training): the chain's own check, each
    # train-mode forward, names a recorded path whose modules did not run.
    holders = [name for name, module in modules.items() if name and (_dropout(module) or _holds_normalization(module))]
    quiet = {name for name in modules if any(name == q or name.startswith(q + ".") for q in holders)}
    return ModeOnlyModules(
        _before(in_train, both | quiet, normalizations), _before(in_eval, both | quiet, normalizations)
    )


def _dropout(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout))


def _holds_normalization(module: nn.Module) -> bool:
    return any(is_normalization(inner) for inner in module.modules())


def train_only_modules(model: nn.Module, example_inputs: Any) -> list[str]:
    """:func:`mode_only_modules`' train-mode-only modules."""
    return mode_only_modules(model, example_inputs).train


def _before(ran: list[str], both: set[str], normalizations: list[str]) -> list[str]:
    """The modules of ``ran`` not in ``both``, outermost, that run before one of ``normalizations`` in ``ran``."""
    only = [name for name in ran if name not in both]
    outermost = [name for name in only if not any(name.startswith(outer + ".") for outer in only if outer != name)]
    order = {name: index for index, name in enumerate(ran)}
    return [name for name in outermost if any(order[n] > order[name] for n in normalizations)]


def _modules_run(model: nn.Module, example_inputs: Any, training: bool) -> list[str] | None:
    """The named modules one forward in the given mode calls, in first-call order; None where it raises."""
    ran: dict[str, None] = {}
    try:
        handles = [
            module.register_forward_pre_hook(lambda _module, _args, _name=name: ran.setdefault(_name))
            for name, module in model.named_modules()
            if name and not isinstance(module, torch.jit.ScriptModule)  # takes no hooks; runs as one opaque call
        ]
    except Exception:  # a module type that refuses hooks
        return None
    try:
        with kept_modes(model), _rngs_kept(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(training)
            call_example(model, copied(example_inputs))
    except Exception:  # the probe only informs: a forward that needs more in train mode is not checked
        return None
    finally:
        for handle in handles:
            handle.remove()
    return list(ran)


@contextlib.contextmanager
def _rngs_kept(model: nn.Module) -> Iterator[None]:
    """The global random number generators (torch's on the CPU and the model's CUDA devices, Python's, NumPy's)
    restored after the block: a train-mode forward draws from them (dropout)."""
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)
