"""Reader for the AliExpress multi-scenario CSV files (AliExpress_NL, _ES, _FR, _US).

The layout the multi-task benchmarks distribute: a header row, then one impression a line
with an id column, ``categorical_1..16`` (integer codes), ``numerical_1..63`` (floats), and
the labels ``click`` and ``conversion`` (0/1). Columns are found by their header name, so
other widths and orders work too: names starting with ``categorical`` or ``numerical`` are
features, ``click`` and ``conversion`` (or ``purchase``) are the two tasks, anything else is
ignored. A file may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pmoe.data.errors import DataFormatError
from p2pmoe.data.multitask import ScenarioData, random_split

CONVERSION_NAMES = ("conversion", "purchase")


@dataclass(frozen=True)
class _Layout:
    """Which columns of a file hold what, by position."""

    width: int
    categorical: dict[str, int]
    numerical: dict[str, int]
    labels: dict[str, int]

    @property
    def used(self) -> list[int]:
        return [*self.categorical.values(), *self.numerical.values(), *self.labels.values()]


def read_aliexpress_csv(
    path: str | Path,
    scenario: str,
    test_path: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ScenarioData:
    """One scenario's examples, tasks ("click", "conversion") (or "purchase", as the header says).

    The public sets ship ``train.csv`` and ``test.csv`` per country: pass both and the split
    is theirs. Given one file, ``test_fraction`` of its rows go to test at random (seeded).
    Categorical cardinalities are the largest code seen plus one; a model shared across
    scenarios should take the maximum over all of them.
    """
    path = Path(path)
    layout = _read_layout(path)
    parts = [_read_rows(path, layout)]
    if test_path is not None:
        test_path = Path(test_path)
        if _read_layout(test_path) != layout:
            raise DataFormatError(test_path, 1, f"the same columns as {path.name}")
        parts.append(_read_rows(test_path, layout))
    categorical = np.concatenate([p[0] for p in parts])
    numerical = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    if test_path is None:
        train_idx, test_idx = random_split(len(labels), test_fraction, np.random.default_rng(seed))
    else:
        train_idx, test_idx = np.arange(len(parts[0][2])), np.arange(len(parts[0][2]), len(labels))
    return ScenarioData(
        name=scenario,
        categorical=categorical,
        categorical_names=tuple(layout.categorical),
        cardinalities=tuple(int(v) + 1 for v in categorical.max(axis=0, initial=-1)),
        numerical=numerical,
        numerical_names=tuple(layout.numerical),
        labels=labels,
        tasks=tuple(layout.labels),
        train_idx=train_idx,
        test_idx=test_idx,
    )


def _lines(path: Path) -> Generator[str, None, None]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from f
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataFormatError(path, None, "a readable (gzip) UTF-8 CSV file", got=str(err)) from None


def _read_layout(path: Path) -> _Layout:
    lines = _lines(path)
    header = next(lines, "")
    lines.close()
    names = [name.strip().strip('"') for name in header.rstrip("\r\n").split(",")]
    conversion = next((n for n in CONVERSION_NAMES if n in names), None)
    if "click" not in names or conversion is None:
        expected = "a header row with a click column and a conversion (or purchase) column"
        raise DataFormatError(path, 1, expected, got=header.strip()[:80])
    layout = _Layout(
        width=len(names),
        categorical={n: i for i, n in enumerate(names) if n.startswith("categorical")},
        numerical={n: i for i, n in enumerate(names) if n.startswith("numerical")},
        labels={"click": names.index("click"), conversion: names.index(conversion)},
    )
    if not layout.categorical and not layout.numerical:
        expected = "feature columns named categorical* or numerical*"
        raise DataFormatError(path, 1, expected, got=header.strip()[:80])
    return layout


def _read_rows(path: Path, layout: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(categorical int64, numerical float32, labels float32), parsed by numpy's C reader; the
    slow line-by-line scan only runs to name the line when something is wrong."""
    groups = {
        "categorical": (layout.categorical, np.float64),
        "numerical": (layout.numerical, np.float32),
        "labels": (layout.labels, np.float32),
    }
    fields = [(key, dtype, (len(cols),)) for key, (cols, dtype) in groups.items() if cols]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on a header-only file
            table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=layout.used, dtype=fields, comments=None, ndmin=1)
    except ValueError as err:
        _raise_first_bad_line(path, layout)
        raise DataFormatError(path, None, "comma-separated numbers", got=str(err)) from None

    def group(key: str) -> np.ndarray:
        cols, dtype = groups[key]
        return table[key] if cols else np.zeros((len(table), 0), dtype=dtype)

    categorical, labels = group("categorical"), group("labels")
    integral = (categorical >= 0) & (categorical == np.round(categorical))
    _check_rows(path, ~integral.all(axis=1), "non-negative integer categorical codes")
    _check_rows(path, ~((labels == 0) | (labels == 1)).all(axis=1), "labels 0 or 1")
    return categorical.astype(np.int64), group("numerical"), labels


def _data_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every data row, skipping blank lines as numpy does."""
    for number, line in enumerate(_lines(path), start=1):
        if number > 1 and line.strip():
            yield number, line


def _raise_first_bad_line(path: Path, layout: _Layout) -> None:
    for number, line in _data_lines(path):
        fields = line.rstrip("\r\n").split(",")
        if len(fields) != layout.width:
            expected = f"{layout.width} comma-separated fields"
            raise DataFormatError(path, number, expected, got=f"{len(fields)} fields")
        for i in layout.used:
            try:
                float(fields[i])
            except ValueError:
                raise DataFormatError(path, number, f"a number in column {i + 1}", got=fields[i]) from None


def _check_rows(path: Path, bad: np.ndarray, expected: str) -> None:
    rows = np.flatnonzero(bad)
    if rows.size:
        number, line = next(item for row, item in enumerate(_data_lines(path)) if row == rows[0])
        raise DataFormatError(path, number, expected, got=line.strip()[:80])
