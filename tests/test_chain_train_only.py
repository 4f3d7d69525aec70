"""Modules the forward runs only in training are not in the eval-mode wiring: conversion warns, naming them.

A step under ``if self.training:`` between two normalizations left the next layer's prior 10x off in variance with
no note and no warning (cold QA, 2026-12-06). The recording stays eval-mode (no statistic changes, no randomness);
a train-mode probe finds such modules and the wiring names them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import bkn_export
from bkn_export.chain.train_probe import train_only_modules


class _Augment(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 3 + 1


class _TrainOnlyBranch(nn.Module):
    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.aug = nn.Sequential(_Augment())
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        if self.training or self.always:
            h = self.aug(h)
        return self.drop(self.b2(self.c2(h)))


def test_a_module_run_only_in_training_is_named_at_conversion() -> None:
    torch.manual_seed(0)
    model = _TrainOnlyBranch()
    with pytest.warns(
        RuntimeWarning, match=r"runs 1 module\(s\) in train mode that it does not run in eval mode: 'aug'"
    ):
        bkn_export.convert_batchnorm(model, torch.randn(4, 3, 8, 8))


def test_the_probe_changes_no_state_and_names_the_outermost_module() -> None:
    """Buffers (running statistics, counters), the global RNG and every module's mode are as before (the probe runs
    on a copy); ``aug.0`` is left out under ``aug``; a model running the same modules in both modes has none."""
    torch.manual_seed(0)
    model = _TrainOnlyBranch()
    model.b1.train()
    model.b2.eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    example = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    assert train_only_modules(model, example) == ["aug"]
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert model.b1.training and not model.b2.training and model.training
    assert train_only_modules(_TrainOnlyBranch(always=True), torch.randn(4, 3, 8, 8)) == []


def test_a_forward_that_fails_in_train_mode_is_not_checked_and_converts() -> None:
    """Batch 1 with one value per channel after pooling: BatchNorm refuses it in train mode; wiring goes on."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.fc, self.bn_fc = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn_fc(self.fc(self.bn(self.conv(x)).mean((2, 3))))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        bkn_export.convert_batchnorm(Head(), torch.randn(1, 3, 8, 8))
    assert train_only_modules(Head(), torch.randn(1, 3, 8, 8)) == []


def test_a_train_only_module_after_the_last_normalization_is_not_named() -> None:
    """An auxiliary head run in training after every normalization lies on no prior's path: no warning."""

    class AuxHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.aux = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.bn(self.conv(x))
            return h + self.aux(h.mean((2, 3)))[:, :1, None, None] if self.training else h

    assert train_only_modules(AuxHead(), torch.randn(4, 3, 8, 8)) == []


def test_a_module_run_only_in_eval_mode_before_a_normalization_is_named_too() -> None:
    """The converse (a third QA round): a step run only in eval mode is in the eval-mode wiring's prior though
    training never runs it."""

    class EvalOnly(_TrainOnlyBranch):
        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.b1(self.c1(x)))
            if not self.training:
                h = self.aug(h)
            return self.b2(self.c2(h))

    torch.manual_seed(0)
    expected = r"runs 1 module\(s\) in eval mode that it does not run in train mode: 'aug'"
    with pytest.warns(RuntimeWarning, match=expected):
        bkn_export.convert_batchnorm(EvalOnly(), torch.randn(4, 3, 8, 8))


def test_dropout_and_blocks_holding_a_normalization_are_not_named() -> None:
    """A fourth QA round: ``nn.Dropout`` under ``if self.training:`` (the prior takes dropout as the identity
    anyway) and a stochastic-depth block skipped at random in training (it holds a normalization: the chain's own
    run check names it when a recorded path does not run) were named."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.conv(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.drop, self.block = nn.Dropout(0.2), Block()
            self.head, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.bn0(self.stem(x)))
            if self.training:
                h = self.drop(h)
            else:
                h = h + self.block(h)  # a block stochastic depth always skips in this (exaggerated) example
            return self.bn1(self.head(h))

    assert train_only_modules(Net(), torch.randn(4, 3, 8, 8)) == []
    from bkn_export.chain.train_probe import mode_only_modules

    assert mode_only_modules(Net(), torch.randn(4, 3, 8, 8)).eval == []
