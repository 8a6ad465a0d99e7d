"""Sampled-negative candidate sets, drawn once with a fixed seed and reusable across runs.

FedDCSR / FMoE-CDSR rank each target against 999 negatives drawn uniformly from the domain's
items, excluding only the target; SyNCRec draws 100 from the items the user never touched.
Both protocols need the same candidates for every method and run, so the draw depends only on
the arguments and a local numpy Generator (never on torch's global RNG), and a drawn set can
be saved and loaded.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# Largest number of int64 cells one vectorised step may allocate (about 64 MB per array).
_CELL_BUDGET = 8_000_000


def check_negatives_fit(pools: Mapping[str, int], n: int, option: str = "negatives") -> None:
    """Refuse ``n`` sampled negatives when a domain's pool is too small, naming every such
    domain at once and the largest ``n`` that fits them all.

    ``pools[d]`` is the fewest negatives any evaluated target of domain ``d`` may be ranked
    against (its domain's items minus what the protocol excludes). Checked before any model is
    built, so a user with short domains of their own learns the remedy in one try. ``option``
    is the ``[task]`` key the remedy names.
    """
    short = {domain: pool for domain, pool in pools.items() if pool < n}
    if not short:
        return
    listed = ", ".join(f"{domain} allows {pool}" for domain, pool in sorted(short.items(), key=lambda kv: kv[1]))
    fits = min(pools.values())
    remedy = (
        f"pass --{option.replace('_', '-')} N (or [task] {option} = N) with N <= {fits}"
        if fits >= 1
        else "a domain without a single candidate cannot be ranked: leave it out of the data"
    )
    raise ValueError(f"{n} sampled negatives per target do not fit {len(short)} of {len(pools)} domains ({listed}); {remedy}")


def sample_negatives(
    num_items: int,
    targets: Sequence[int] | Tensor,
    n: int,
    seed: int,
    exclude: Sequence[set[int]] | None = None,
) -> Tensor:
    """Draw ``n`` distinct negatives per row, uniformly from the items the row allows.

    Row ``i`` never contains ``targets[i]`` nor anything in ``exclude[i]``; its ``n`` items
    are a uniformly random subset of the allowed ones, in random order. Returns an int64
    tensor ``[len(targets), n]``. Raises ValueError when a row allows fewer than ``n`` items
    or an id lies outside ``[0, num_items)``.
    """
    if num_items < 1 or n < 0:
        raise ValueError(f"need num_items >= 1 and n >= 0, got num_items={num_items}, n={n}")
    t = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets, dtype=np.int64)
    if t.ndim != 1:
        raise ValueError(f"targets must be one-dimensional, got shape {t.shape}")
    if exclude is not None and len(exclude) != t.size:
        raise ValueError(f"exclude has {len(exclude)} sets but there are {t.size} targets")
    forbidden = _forbidden_keys(num_items, t, exclude)
    allowed = num_items - np.bincount(forbidden // num_items, minlength=t.size)
    short = np.flatnonzero(allowed < n)
    if short.size:
        i = short[0]
        raise ValueError(f"row {i} allows only {allowed[i]} negatives out of {num_items} items but n={n} were requested ({short.size} row(s) too short)")
    out = np.empty((t.size, n), dtype=np.int64)
    if n:
        rng = np.random.default_rng(seed)
        # Rejection wastes most draws once n is over half of what a row allows.
        dense = 2 * n > allowed
        _fill_dense(out, np.flatnonzero(dense), num_items, n, forbidden, rng)
        _fill_by_rejection(out, np.flatnonzero(~dense), allowed, num_items, n, forbidden, rng)
    return torch.from_numpy(out)


def _forbidden_keys(num_items: int, targets: np.ndarray, exclude: Sequence[set[int]] | None) -> np.ndarray:
    """Sorted unique ``row * num_items + item`` keys of every (row, item) a row may not draw."""
    rows = np.arange(targets.size, dtype=np.int64)
    items = targets
    if exclude is not None:
        sizes = np.fromiter((len(s) for s in exclude), dtype=np.int64, count=len(exclude))
        flat = np.fromiter((i for s in exclude for i in s), dtype=np.int64, count=int(sizes.sum()))
        rows = np.concatenate([rows, np.repeat(rows, sizes)])
        items = np.concatenate([targets, flat])
    if items.size and (items.min() < 0 or items.max() >= num_items):
        raise ValueError(f"targets and excluded items must lie in [0, {num_items})")
    return np.unique(rows * num_items + items)


def _is_forbidden(keys: np.ndarray, forbidden: np.ndarray) -> np.ndarray:
    if forbidden.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.searchsorted(forbidden, keys).clip(max=forbidden.size - 1)
    return forbidden[pos] == keys


def _fill_by_rejection(
    out: np.ndarray,
    rows: np.ndarray,
    allowed: np.ndarray,
    num_items: int,
    n: int,
    forbidden: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Keep the first ``n`` distinct allowed items of an i.i.d. uniform stream per row.

    Those form a uniform random subset. Rows whose stream runs short are redrawn whole;
    the shortfall event is symmetric in the allowed items, so this keeps uniformity.
    """
    while rows.size:
        draws = _draws_needed(allowed[rows], num_items, n)
        order = np.argsort(draws, kind="stable")
        rows, draws = rows[order], draws[order]
        retry = []
        step = max(1, _CELL_BUDGET // int(draws[-1]))
        for start in range(0, rows.size, step):
            chunk = rows[start : start + step]
            m = int(draws[start : start + step][-1])
            cand = rng.integers(0, num_items, size=(chunk.size, m), dtype=np.int64)
            ok = _first_occurrence(cand)
            ok &= ~_is_forbidden(chunk[:, None] * num_items + cand, forbidden)
            done = ok.sum(axis=1) >= n
            ok &= np.cumsum(ok, axis=1) <= n
            out[chunk[done]] = cand[done][ok[done]].reshape(-1, n)
            retry.append(chunk[~done])
        rows = np.concatenate(retry)


def _draws_needed(allowed: np.ndarray, num_items: int, n: int) -> np.ndarray:
    """Stream length per row: expected draws to see ``n`` distinct allowed items plus 3 sd."""
    uniq, inverse = np.unique(allowed, return_inverse=True)
    p = (uniq[:, None] - np.arange(n)) / num_items  # success chance of the i-th new item
    mean = (1 / p).sum(axis=1)
    sd = np.sqrt(((1 - p) / p**2).sum(axis=1))
    return np.ceil(mean + 3 * sd + 8).astype(np.int64)[inverse.ravel()]


def _first_occurrence(cand: np.ndarray) -> np.ndarray:
    """True where an entry is the first of its value in its row."""
    order = np.argsort(cand, axis=1, kind="stable")
    sorted_ = np.take_along_axis(cand, order, axis=1)
    first = np.ones(cand.shape, dtype=bool)
    np.put_along_axis(first, order[:, 1:], sorted_[:, 1:] != sorted_[:, :-1], axis=1)
    return first


def _fill_dense(
    out: np.ndarray,
    rows: np.ndarray,
    num_items: int,
    n: int,
    forbidden: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Give every allowed item a random key and keep the ``n`` smallest, in key order."""
    step = max(1, _CELL_BUDGET // num_items)
    for start in range(0, rows.size, step):
        chunk = rows[start : start + step]
        keys = rng.random((chunk.size, num_items))
        lo, hi = np.searchsorted(forbidden, [chunk[0] * num_items, (chunk[-1] + 1) * num_items])
        hit = forbidden[lo:hi]
        local = np.searchsorted(chunk, hit // num_items)
        mine = chunk[local.clip(max=chunk.size - 1)] == hit // num_items
        keys[local[mine], hit[mine] % num_items] = np.inf
        pick = np.argpartition(keys, n - 1, axis=1)[:, :n]
        by_key = np.argsort(np.take_along_axis(keys, pick, axis=1), axis=1)
        pick = np.take_along_axis(pick, by_key, axis=1)
        out[chunk] = pick


def save_negatives(path: str | Path, negatives: Tensor | np.ndarray) -> None:
    """Write a candidate set to ``path`` as .npy, atomically so a crash never leaves half a file."""
    if isinstance(negatives, Tensor):
        negatives = negatives.detach().cpu().numpy()
    arr = np.asarray(negatives)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"negatives must be a 2-D integer array, got {arr.dtype} {arr.shape}")
    path = Path(path)
    # A unique name in the same directory keeps os.replace atomic; open() honours the umask,
    # unlike mkstemp's private 0600 mode, so a shared cache stays readable.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.save(f, arr.astype(np.int64, copy=False), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_negatives(path: str | Path) -> Tensor:
    """Read a candidate set written by :func:`save_negatives` (never unpickles anything)."""
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: expected a 2-D integer array, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64, copy=False))
