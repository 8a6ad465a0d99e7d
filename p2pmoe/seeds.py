"""Every per-node random stream of a run, derived in one place from `run.seed` (issue 27).

`node_stream(seed, purpose, k)` is the one derivation of a node's streams; the formulas are
the ones the project used before they were gathered here, so runs made earlier draw the same
numbers:

| purpose | formula | what draws from it |
|---|---|---|
| `shuffle` | `seed * 1000 + k` | a learner's batch order, validation splits, FedMoE-DA's held-out examples |
| `cap` | `seed + k` | which examples `max_train_per_node` keeps |
| `split` | `seed + k` | a scenario's own train/test split (AliExpress countries) |
| `gate` | `seed * 1_000_003 + k` | an accounting run's per-node gate |
| `runner` | `seed * 1_000_003 + k`, k = CRC-32 of the node id | the node's own torch stream for dropout and sampling (`NodeRunner`) |
| `attack` | `seed * 7_919 + k` | an attacker's noise (issue 30) |
| `dp` | `seed * 104_729 + k` | the server's DP noise (k = 0) |

Data-wide draws (the partition, the global test sample, sampled users) take `run.seed` itself.
Initial weights are the same on every node: `seeded_init(seed)` builds a model from `seed`
inside a fork of torch's CPU generator, which it leaves as it found it (no code seeds the
global generator for good, so nothing built later depends on what was built before).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_FORMULAS = {
    "shuffle": lambda seed, k: seed * 1000 + k,
    "cap": lambda seed, k: seed + k,
    "split": lambda seed, k: seed + k,
    "gate": lambda seed, k: seed * 1_000_003 + k,
    "runner": lambda seed, k: seed * 1_000_003 + k,
    "attack": lambda seed, k: seed * 7_919 + k,
    "dp": lambda seed, k: seed * 104_729 + k,
}


def node_stream(seed: int, purpose: str, k: int) -> int:
    """The seed of node `k`'s stream for `purpose` (see the table above)."""
    if purpose not in _FORMULAS:
        raise ValueError(f"unknown stream {purpose!r}; one of {sorted(_FORMULAS)}")
    return int(_FORMULAS[purpose](seed, k))


def runner_stream(seed: int, node: str) -> int:
    """The seed of node `node`'s own torch stream (by name: a daemon knows no index)."""
    return node_stream(seed, "runner", zlib.crc32(node.encode()))


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with `seed`, then restore its state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
