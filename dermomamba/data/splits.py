"""Data splits: the published one (scikit-learn's ``train_test_split`` reproduced exactly), a proper
train / validation / test split, and saving/loading a split with a run.

The paper split the 2,594 ISIC 2018 training images with ``train_test_split(ids, test_size=520,
random_state=257)`` on the sorted ids and used the 520 for both validation and test. scikit-learn is not a
dependency: :func:`train_test_split_indices` computes the same split with numpy — scikit-learn's
``ShuffleSplit`` draws ``np.random.RandomState(random_state).permutation(n)``, takes the first ``n_test``
positions as the test set and the next ``n_train`` as the training set, in that order.

    >>> split = published_split([f"ISIC_{i:07d}" for i in range(2594)])
    >>> len(split["train"]), len(split["val"]), split["val"] == split["test"]
    (2074, 520, True)
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

__all__ = ["train_test_split_indices", "published_split", "random_split", "save_split", "load_split",
           "PUBLISHED_TEST_SIZE", "PUBLISHED_RANDOM_STATE"]

PUBLISHED_TEST_SIZE = 520
PUBLISHED_RANDOM_STATE = 257
ISIC2018_TRAINING_COUNT = 2594


def _split_sizes(n: int, test_size, train_size=None) -> tuple[int, int]:
    # scikit-learn's rule: a float test size rounds up, a float train size rounds down.
    if isinstance(test_size, float):
        if not 0 < test_size < 1:
            raise ValueError(f"a float test_size must be in (0, 1), got {test_size}")
        n_test = math.ceil(test_size * n)
    else:
        n_test = int(test_size)
    if train_size is None:
        n_train = n - n_test
    elif isinstance(train_size, float):
        n_train = math.floor(train_size * n)
    else:
        n_train = int(train_size)
    if n_test <= 0 or n_train <= 0 or n_test + n_train > n:
        raise ValueError(f"cannot split {n} samples into train {n_train} and test {n_test}")
    return n_train, n_test


def train_test_split_indices(n: int, test_size, random_state: int, train_size=None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays equal to scikit-learn's ``train_test_split(range(n), test_size=...,
    random_state=...)`` (shuffled, not stratified).

        >>> train, test = train_test_split_indices(10, 0.3, random_state=0)   # len 7 and 3
    """
    n_train, n_test = _split_sizes(n, test_size, train_size)
    permutation = np.random.RandomState(random_state).permutation(n)
    return permutation[n_test:n_test + n_train], permutation[:n_test]


def published_split(ids: Sequence[str], test_size: int = PUBLISHED_TEST_SIZE,
                    random_state: int = PUBLISHED_RANDOM_STATE) -> dict:
    """The paper's split of the sorted ids: {'train': [...], 'val': [...], 'test': [...]} with val == test.

    Meant for the 2,594 ISIC 2018 training images (2,074 / 520); other sizes work but are not the paper's.
    """
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError("ids must be unique")
    train, test = train_test_split_indices(len(ordered), test_size, random_state)
    held_out = [ordered[i] for i in test]
    return {"method": "published", "test_size": test_size, "random_state": random_state,
            "note": "validation and test are the same 520 images, as in the paper",
            "train": [ordered[i] for i in train], "val": held_out, "test": list(held_out)}


def random_split(ids: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> dict:
    """A proper three-way split of the sorted ids (disjoint train / val / test), reproducible by ``seed``.

        >>> split = random_split([str(i) for i in range(100)], 0.1, 0.2, seed=1)   # 70 / 10 / 20
    """
    ordered = sorted(ids)
    n = len(ordered)
    if len(set(ordered)) != n:
        raise ValueError("ids must be unique")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
                         "and sum below 1")
    n_val = max(1, math.ceil(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, math.ceil(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} samples are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    order = np.random.RandomState(seed).permutation(n)
    pick = lambda positions: [ordered[i] for i in sorted(positions)]
    return {"method": "random", "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "train": pick(order[n_val + n_test:]), "val": pick(order[:n_val]),
            "test": pick(order[n_val:n_val + n_test])}


def save_split(split: dict, path: str | os.PathLike) -> None:
    """Write a split as JSON (atomically: a temporary file renamed into place)."""
    path = os.fspath(path)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(split, handle, indent=1)
    os.replace(temporary, path)


def load_split(path: str | os.PathLike) -> dict:
    """Read a split written by :func:`save_split` (or any JSON with 'train' and 'val' id lists)."""
    with open(os.fspath(path)) as handle:
        split = json.load(handle)
    for key in ("train", "val"):
        if not isinstance(split.get(key), list):
            raise ValueError(f"split file {path} has no '{key}' list of ids")
    split.setdefault("test", [])
    return split
