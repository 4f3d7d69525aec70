"""Optimizer parameter groups that keep weight decay off the normalization layers' parameters.

Weight decay pulls a parameter toward 0. For BKN's own parameters 0 is not "no effect": the process noise is
R = softplus(``process_noise_raw``), initialised at raw = -7 (R = 9e-4), so decay pulls R toward softplus(0) =
0.69, a prior variance inflated by about the variance of a normalized activation; ``prior_weight_logit`` decays
toward the gain p = 0.5 whatever it was initialised to, and a learned ``transition_matrix`` (initialised to
the identity) toward 0, a prior mean of 0. Decaying γ, β of BatchNorm is commonly avoided for related reasons.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bkn_export.nn import _BatchKalmanNorm

__all__ = ["parameter_groups"]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer parameter groups of ``model``'s trainable parameters: every other parameter with
    ``weight_decay``, and every parameter of a BKN or BatchNorm layer (γ, β, the Kalman gain and process noise, a
    learned transition matrix) with weight decay 0. Each parameter appears once (shared ones included).

    Use: ``torch.optim.SGD(bkn_export.parameter_groups(model, 5e-4), lr=0.1, momentum=0.9)``.
    """
    normalization: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (_BatchKalmanNorm, nn.modules.batchnorm._NormBase)):
            # its own parameters, and the originals of a parametrized γ or β (torch.nn.utils.parametrize keeps them
            # in module.parametrizations); not those of a fused layer's activation or dropout
            parametrizations = module._modules.get("parametrizations")
            owned = [*module.parameters(recurse=False)]
            if parametrizations is not None:
                owned += parametrizations.parameters()
            for parameter in owned:
                normalization[id(parameter)] = parameter
    decayed = [p for p in model.parameters() if id(p) not in normalization and p.requires_grad]
    undecayed = [p for p in normalization.values() if p.requires_grad]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
