"""Regenerate ``chain_v1_state_dicts.pt``: checkpoints in the version-1 wiring format.

Run with the package of commit 9ccb94c (the last with execution-order wiring), e.g.::

    git archive 9ccb94c bkn_export | tar -x -C /tmp/v1
    python tests/data/make_chain_v1_state_dicts.py /tmp/v1 tests/data/chain_v1_state_dicts.pt

For each transition it stores the trained model's ``state_dict``, an input ``x`` and what
that code computed on it: one train-mode forward (on a copy) and one eval-mode forward.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def plain_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    )


def main(package_root: str, out: str) -> None:
    sys.path.insert(0, package_root)
    import bkn_export

    assert bkn_export.__file__.startswith(package_root), bkn_export.__file__
    example = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    saved = {}
    for transition in ("propagate", "identity"):
        model = bkn_export.convert_batchnorm(plain_chain(), example, transition=transition).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(2, 3, 6, 6)).square().mean().backward()
            optimizer.step()
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            train_output = copy.deepcopy(model).train()(x)
            eval_output = model.eval()(x)
        saved[transition] = {
            "state_dict": model.state_dict(),
            "x": x,
            "train_output": train_output,
            "eval_output": eval_output,
        }
    torch.save(saved, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
