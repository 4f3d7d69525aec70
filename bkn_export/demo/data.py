"""Built-in data: scikit-learn's handwritten digits (1797 images, 8×8, 10 classes).

Nothing is downloaded: the data ships inside scikit-learn, which the ``[demo]`` extra
installs; it is imported on use (:class:`bkn_export.demo.DemoDependencyError` without it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bkn_export.demo import missing_dependency

__all__ = ["DigitsSplit", "load_digits_split"]


class DigitsSplit(NamedTuple):
    """x_*: (N, 1, 8, 8) float32 standardized with training statistics; y_*: (N,) int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """A stratified, seeded train/test split of the digits, standardized per pixel-set.

    Raises :class:`bkn_export.demo.DemoDependencyError` when scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise missing_dependency("scikit-learn", "the digits data (bkn_export.demo.data)", error) from error

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    return DigitsSplit(
        torch.from_numpy((x_train - mean) / std),
        torch.from_numpy(y_train),
        torch.from_numpy((x_test - mean) / std),
        torch.from_numpy(y_test),
    )
