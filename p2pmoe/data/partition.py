"""Split a labelled data set across clients: IID, Dirichlet label skew, or label shards.

Every scheme is expressed as one matrix of class shares S[c, k] (the fraction of class c that
client k receives). Applying the same matrix to the train and the test set gives every client
a test split with the label distribution of its train split, which is what personalised
accuracy needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientSplit:
    """Indices into the shared train and test arrays that belong to one client."""

    train: np.ndarray
    test: np.ndarray


def parse_scheme(scheme: str) -> tuple[str, float]:
    """'iid', 'dirichlet:0.5' or 'shards:2' -> (name, parameter)."""
    name, _, arg = scheme.partition(":")
    if name == "iid" and not arg:
        return name, 0.0
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if name == "dirichlet" and value > 0:
        return name, value
    if name == "shards" and value >= 1 and value == int(value):
        return name, value
    raise ValueError(f"partition {scheme!r}: expected 'iid', 'dirichlet:ALPHA' (ALPHA > 0) or 'shards:N' (N >= 1 classes per client)")


def class_shares(num_classes: int, num_clients: int, scheme: str, seed: int) -> np.ndarray:
    """The [num_classes, num_clients] matrix of class shares for `scheme`; each class's row
    sums to 1 over clients (or to 0 for a class no shard dealt)."""
    if num_clients < 1 or num_classes < 1:
        raise ValueError("need at least one class and one client")
    name, value = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    if name == "iid":
        return np.full((num_classes, num_clients), 1.0 / num_clients)
    if name == "dirichlet":
        return rng.dirichlet(np.full(num_clients, value), size=num_classes)
    per_client = int(value)
    if per_client > num_classes:
        raise ValueError(f"shards:{per_client} asks for more classes per client than the {num_classes} there are")
    # Deal num_clients * per_client shards round-robin over a shuffled class order, so every
    # class is dealt as evenly as the counts allow.
    shards = np.resize(rng.permutation(num_classes), num_clients * per_client)
    rng.shuffle(shards)
    counts = np.zeros((num_classes, num_clients))
    for client in range(num_clients):
        for cls in shards[client * per_client : (client + 1) * per_client]:
            counts[cls, client] += 1
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def split_by_shares(labels: np.ndarray, shares: np.ndarray, seed: int) -> list[np.ndarray]:
    """Assign each example to one client so that client k holds ~shares[c, k] of class c."""
    rng = np.random.default_rng(seed)
    num_classes, num_clients = shares.shape
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.round(np.cumsum(shares[cls]) * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts[:-1])):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def partition_clients(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, scheme: str, seed: int) -> list[ClientSplit]:
    """Train and test indices per client, both drawn with the same class shares."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    shares = class_shares(num_classes, num_clients, scheme, seed)
    train = split_by_shares(np.asarray(train_labels), shares, seed + 1)
    test = split_by_shares(np.asarray(test_labels), shares, seed + 2)
    empty = [k for k, idx in enumerate(train) if len(idx) == 0]
    if empty:
        raise ValueError(f"partition {scheme!r} left clients {empty} with no training data; use fewer clients or a larger alpha")
    return [ClientSplit(tr, te) for tr, te in zip(train, test, strict=True)]
