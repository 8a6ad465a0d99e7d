"""Multi-scenario multi-task examples, the common currency of PF-MSMTrec and MMoE baselines.

MovieLens age groups and AliExpress countries both become one ``ScenarioData`` per scenario,
so the method sees the same arrays whichever data set it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ScenarioData:
    """All examples of one scenario (one client), with a fixed train/test split.

    ``categorical[:, j]`` holds codes ``0..cardinalities[j]-1`` of the feature
    ``categorical_names[j]``; ``numerical`` holds real-valued features; ``labels[:, t]`` is the
    0/1 label of task ``tasks[t]``. ``train_idx`` and ``test_idx`` index rows, disjoint and
    sorted.
    """

    name: str
    categorical: np.ndarray
    categorical_names: tuple[str, ...]
    cardinalities: tuple[int, ...]
    numerical: np.ndarray
    numerical_names: tuple[str, ...]
    labels: np.ndarray
    tasks: tuple[str, ...]
    train_idx: np.ndarray
    test_idx: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __post_init__(self) -> None:
        n = len(self.labels)
        shapes_ok = (
            self.categorical.shape == (n, len(self.categorical_names))
            and len(self.cardinalities) == len(self.categorical_names)
            and self.numerical.shape == (n, len(self.numerical_names))
            and self.labels.shape == (n, len(self.tasks))
        )
        if not shapes_ok:
            raise ValueError(f"scenario {self.name!r}: feature, label and name shapes disagree")


def random_split(n: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` at random into sorted train and test indices.

    ``round(n * test_fraction)`` rows go to test. Passing the generator (not a seed) lets one
    seeded stream split several scenarios reproducibly.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = rng.permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def keep_rows(data: ScenarioData, rows: np.ndarray) -> ScenarioData:
    """The scenario restricted to `rows` (sorted indices), its train/test split kept."""
    rows = np.asarray(rows, dtype=np.int64)
    position = np.full(len(data), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))

    def remap(idx: np.ndarray) -> np.ndarray:
        kept = position[idx]
        return kept[kept >= 0]

    return ScenarioData(
        name=data.name,
        categorical=data.categorical[rows],
        categorical_names=data.categorical_names,
        cardinalities=data.cardinalities,
        numerical=data.numerical[rows],
        numerical_names=data.numerical_names,
        labels=data.labels[rows],
        tasks=data.tasks,
        train_idx=remap(data.train_idx),
        test_idx=remap(data.test_idx),
    )
