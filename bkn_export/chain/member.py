"""A layer's membership of a chain: its wiring value, its transition, and its root.

:class:`ChainMembership` is what :func:`bkn_export.wire_chain` gives each BKN layer
(``layer.chain``; the :class:`bkn_export.nn.ChainMember` protocol). It is an immutable
value: a synchronised copy of a layer (``SyncBatchKalmanNorm``) and a deep copy of the
model carry it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from bkn_export.chain.scope import ChainRoot, Published, observers, scratch_for
from bkn_export.chain.transitions import Transition, transition_for
from bkn_export.chain.wiring import Wiring, check_saved_wiring
from bkn_export.nn import Prior, _BatchKalmanNorm

__all__ = ["ChainMembership", "standalone_member"]


@dataclass(frozen=True)
class ChainMembership:
    """A layer's place in the chain of ``root``.

    root: the wired root's token (None: a standalone layer, which only reports to
    observers); wiring: the layer's :class:`Wiring`.
    """

    root: ChainRoot | None = field(compare=False, repr=False)
    wiring: Wiring
    _transition: Transition | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_transition", transition_for(self.wiring))

    @property
    def name(self) -> str:
        return self.wiring.name

    @property
    def has_predecessor(self) -> bool:
        return self.wiring.transition is not None

    @property
    def transition(self) -> str | None:
        return self.wiring.transition

    def prior(self, layer: _BatchKalmanNorm, x: Tensor) -> Prior | None:
        """This call's prior from the root's scratch; None outside a forward of the root."""
        prior = None
        if self._transition is not None and self.root is not None:
            scratch = scratch_for(self.root)
            if scratch is not None:
                prior = self._transition.predict(layer, scratch.published, scratch.modules, x, scratch.predictions)
        for observer in observers():
            observer.saw_prior(layer, prior)
        return prior

    def publish(
        self,
        layer: _BatchKalmanNorm,
        x: Tensor,
        op_prior: tuple[Tensor, Tensor, Tensor],
        posterior_mean: Tensor,
        posterior_variance: Tensor,
        count: Any,
    ) -> None:
        """Hand the posterior on to the layers this one feeds (and to observers)."""
        published = Published(
            posterior_mean, posterior_variance, count, tuple(x.shape), layer.weight, layer.bias, layer.eps
        )
        if self.root is not None:
            scratch = scratch_for(self.root)
            if scratch is not None:
                scratch.published[self.wiring.name] = published
        for observer in observers():
            observer.saw_posterior(layer, published, op_prior, x)

    def wiring_state(self) -> dict[str, Any] | None:
        return self.wiring.to_dict() if self.root is not None else None

    def load_state(self, state: Any, label: str) -> None:
        check_saved_wiring(state, self.wiring, label)


def standalone_member(name: str) -> ChainMembership:
    """A first-in-chain membership with no root: the layer is BatchNorm and reports to observers."""
    return ChainMembership(None, Wiring(name, None, notes=("not wired: BatchNorm",)))
