"""Cross-domain interactions from any RecBole atomic files, and the two views built on them.

A user's folder holds ``NAME.inter`` (``user_id``, ``item_id``, ``timestamp``) and
``NAME.item`` with a categorical field naming each item's domain (``--domain-field``).
``load_atomic_domains`` reads them into ``CrossDomainInteractions``; MovieLens genre domains
are one instance of the same type (``p2pmoe.data.movielens.genre_interactions``). From it:
- ``non_overlapped_domains``: one ``DomainSequences`` per domain with disjoint users
  (FMoE-CDSR, FedSASRec, Local SASRec);
- ``overlapped_timelines``: each user's merged, time-ordered history with a domain label per
  item (SyNCRec).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pmoe.data.atomic import AtomicTable, read_atomic
from p2pmoe.data.errors import DataFormatError, DataNotFoundError
from p2pmoe.data.sequences import DomainSequences, Timeline


class RenumberedIds:
    """Users and items renumbered ``0..n-1`` from the files' tokens: ``user_tokens[u]`` and
    ``item_tokens[i]`` give back the ids; their counts follow."""

    user_tokens: list[str]
    item_tokens: list[str]

    @property
    def num_users(self) -> int:
        return len(self.user_tokens)

    @property
    def num_items(self) -> int:
        return len(self.item_tokens)


@dataclass
class CrossDomainInteractions(RenumberedIds):
    """Interactions with users and items renumbered ``0..n-1`` in order of first appearance.

    ``user``, ``item`` and ``timestamp`` hold one entry per interaction, in file order;
    ``item_domain[i]`` is the index into ``domains`` of item ``i`` (-1: no domain, left out of
    every view). ``user_tokens`` / ``item_tokens`` give back the files' ids.
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    item_domain: np.ndarray
    domains: tuple[str, ...]
    user_tokens: list[str]
    item_tokens: list[str]


def renumber(tokens: list[str]) -> tuple[np.ndarray, list[str]]:
    """Codes ``0..n-1`` in order of first appearance, and the tokens in code order."""
    index = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return np.array([index[t] for t in tokens], dtype=np.int64), list(index)


def finite_column(table: AtomicTable, name: str) -> np.ndarray:
    """A ``float`` column whose every value is finite, else a DataFormatError naming the line."""
    values = table.column(name, "float")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DataFormatError(table.path, table.line_of(bad[0]), f"a finite number in column {name!r}", got=str(values[bad[0]]))
    return values


def atomic_files(folder: str | Path, name: str | None = None) -> tuple[Path, Path]:
    """``(NAME.inter, NAME.item)`` of a folder; NAME defaults to the folder's name."""
    root = Path(folder)
    stem = name or root.name
    paths = (root / f"{stem}.inter", root / f"{stem}.item")
    for path in paths:
        if not path.is_file():
            raise DataNotFoundError(stem, path, "a folder of RecBole atomic files needs NAME.inter and NAME.item (--data-root DIR)" + _nearby(root))
    return paths


def _nearby(root: Path) -> str:
    """Where atomic files are near a wrong --data-root: its sub-folders NAME/ holding
    NAME.inter (the user pointed at the parent), or .inter files under another name."""
    if not root.is_dir():
        return ""
    inside = sorted(sub for sub in root.iterdir() if sub.is_dir() and (sub / f"{sub.name}.inter").is_file())
    if inside:
        return "; did you mean " + " or ".join(f"--data-root {sub}" for sub in inside[:5]) + "?"
    others = sorted(p.name for p in root.glob("*.inter"))
    if others:
        return f"; {root} holds {', '.join(others[:5])}: name the folder after the files (NAME/NAME.inter)"
    return ""


def load_atomic_domains(folder: str | Path, domain_field: str, name: str | None = None, min_users: int = 2, min_items: int = 2) -> CrossDomainInteractions:
    """Read ``NAME.inter`` (``user_id:token item_id:token timestamp:float``) and ``NAME.item``
    (``item_id:token`` and ``domain_field``, typed token, token_seq or float).

    Project decision: a ``token_seq`` domain field gives each item the first token it lists;
    domains are numbered in sorted order of their names; items the ``.item`` file does not
    name (or names with an empty field) have no domain. A domain with fewer than ``min_users``
    users or ``min_items`` items is an error that names it (its views would be empty).
    """
    inter_path, item_path = atomic_files(folder, name)
    inter = read_atomic(inter_path)
    user, user_tokens = renumber(inter.column("user_id", "token"))
    item, item_tokens = renumber(inter.column("item_id", "token"))
    timestamp = finite_column(inter, "timestamp")
    items = read_atomic(item_path)
    labels = _domain_labels(items, domain_field)
    first: dict[str, str] = {}
    for token, label in zip(items.column("item_id", "token"), labels, strict=True):
        first.setdefault(token, label)
    per_item = [first.get(t, "") for t in item_tokens]
    domains = tuple(sorted({label for label in per_item if label}))
    if not domains:
        raise DataFormatError(item_path, 2, f"a non-empty {domain_field!r} for the items of {inter_path.name}", got="none")
    code = {d: i for i, d in enumerate(domains)}
    item_domain = np.array([code.get(label, -1) for label in per_item], dtype=np.int64)
    data = CrossDomainInteractions(
        name=Path(folder).name if name is None else name,
        user=user,
        item=item,
        timestamp=timestamp,
        item_domain=item_domain,
        domains=domains,
        user_tokens=user_tokens,
        item_tokens=item_tokens,
    )
    check_domain_sizes(data, min_users, min_items)
    return data


def _domain_labels(table: AtomicTable, field: str) -> list[str]:
    column = table.column(field, "token", "token_seq", "float")
    if isinstance(column, np.ndarray):
        return ["" if np.isnan(v) else (str(int(v)) if float(v).is_integer() else repr(float(v))) for v in column]
    return [v if isinstance(v, str) else (v[0] if v else "") for v in column]


def check_domain_sizes(data: CrossDomainInteractions, min_users: int, min_items: int) -> None:
    """Raise ValueError naming every domain with too few users or items."""
    dom = data.item_domain[data.item]
    known = dom >= 0
    users = np.bincount(np.unique(dom[known] * data.num_users + data.user[known]) // data.num_users, minlength=len(data.domains))
    seen = data.item_domain[np.unique(data.item)]
    items = np.bincount(seen[seen >= 0], minlength=len(data.domains))
    small = [f"{d} ({users[i]} users, {items[i]} items)" for i, d in enumerate(data.domains) if users[i] < min_users or items[i] < min_items]
    if small:
        raise ValueError(f"{data.name}: domains need at least {min_users} users and {min_items} items; too small: {', '.join(small)}")


def time_order(data: CrossDomainInteractions, keep: np.ndarray) -> np.ndarray:
    """Indices of the kept interactions sorted by user, then time, ties in file order."""
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(data.timestamp[idx], kind="stable")]
    return idx[np.argsort(data.user[idx], kind="stable")]


def user_runs(users: np.ndarray) -> Iterator[tuple[int, slice]]:
    """(user, slice) for each run of equal values in a user-sorted array."""
    if users.size == 0:
        return
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]).tolist()
    for start, stop in zip(starts, starts[1:] + [len(users)], strict=True):
        yield int(users[start]), slice(start, stop)


def non_overlapped_domains(data: CrossDomainInteractions, min_len: int = 5, max_len: int | None = 200) -> list[DomainSequences]:
    """One ``DomainSequences`` per domain with disjoint users, like FedDCSR's FKCB.

    Project decision (not from the papers): each user goes to the domain where they have the
    most interactions, ties going to the earlier domain, and keeps only their items of that
    domain; users left with fewer than ``min_len`` items are dropped. Item ids are renumbered
    per domain over the items its users touched, in catalogue order (``global_items`` maps
    them back). Split, leave-one-out on each time-ordered sequence s (ties in time keep file
    order): test = s, valid = s[:-1], train = s[:-2], each cut to its most recent ``max_len``
    items (None: no cut).
    """
    if min_len < 3:
        raise ValueError(f"min_len must be at least 3 so that every split is non-empty, got {min_len}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be at least 2 (an input and a target), got {max_len}")
    domain = data.item_domain[data.item]
    k = len(data.domains)
    known = domain >= 0
    counts = np.bincount(data.user[known] * k + domain[known], minlength=data.num_users * k)
    home = counts.reshape(data.num_users, k).argmax(axis=1)
    order = time_order(data, known & (domain == home[data.user]))
    users, items = data.user[order], data.item[order]
    members: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(k)]
    for u, run in user_runs(users):
        if run.stop - run.start >= min_len:
            members[home[u]].append((u, items[run]))
    return [_leave_one_out(name, seqs, max_len) for name, seqs in zip(data.domains, members, strict=True)]


def overlapped_timelines(data: CrossDomainInteractions, min_len: int = 3) -> list[Timeline]:
    """Every user's time-ordered history over all domains (ties keep file order), with
    catalogue-wide item ids; users with fewer than ``min_len`` items are dropped."""
    domain = data.item_domain[data.item]
    order = time_order(data, domain >= 0)
    return [
        Timeline(u, data.item[order[run]], domain[order[run]], data.timestamp[order[run]])
        for u, run in user_runs(data.user[order])
        if run.stop - run.start >= min_len
    ]


def _leave_one_out(name: str, members: list[tuple[int, np.ndarray]], max_len: int | None) -> DomainSequences:
    """Renumber a domain's items over its members' sequences and split each leave-one-out."""
    catalogue = np.unique(np.concatenate([s for _, s in members] + [np.zeros(0, dtype=np.int64)]))
    local = [np.searchsorted(catalogue, s) for _, s in members]
    users = [u for u, _ in members]

    def tail(seq: np.ndarray) -> list[int]:
        return (seq if max_len is None else seq[-max_len:]).tolist()

    return DomainSequences(
        name=name,
        num_items=len(catalogue),
        train=[tail(s[:-2]) for s in local],
        valid=[tail(s[:-1]) for s in local],
        test=[tail(s) for s in local],
        train_users=list(users),
        valid_users=list(users),
        test_users=list(users),
        global_items=catalogue,
    )
