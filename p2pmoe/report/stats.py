"""Statistics for comparisons over seeds: spread, paired differences and when to call one.

Pure functions over plain numbers (no torch), shared by every benchmark table.

Project decision (the rule the issues state): a method is said to beat another only when the
mean of their paired differences over seeds lies more than two standard errors from zero,
with at least `MIN_SEEDS` seeds. The seed is the unit of replication: each seed changes the
partition, the initial weights and the sampling, so per-seed differences are independent,
whereas the nodes of one seed share a run and are not. Per-node pairs are still kept and
summarised (a 95 % interval over node x seed pairs) to show where a method wins or loses.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr

MIN_SEEDS = 3


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation and standard error of a few values (seeds)."""

    mean: float
    std: float
    n: int

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else float("nan")


def spread(values: Sequence[float]) -> Spread:
    """`Spread` of `values`; the standard deviation of one value is undefined (nan)."""
    if not values:
        raise ValueError("spread of no values")
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan"), len(values))


@dataclass(frozen=True)
class Paired:
    """`a - b` paired by seed (and summarised over node x seed pairs when nodes are given)."""

    by_seed: Spread
    per_pair: Spread | None  # over every (seed, node) pair both runs scored

    @property
    def significant(self) -> bool:
        """At least `MIN_SEEDS` seeds and the mean more than two standard errors from zero."""
        s = self.by_seed
        return s.n >= MIN_SEEDS and not math.isnan(s.se) and abs(s.mean) > 2 * s.se

    @property
    def verdict(self) -> str:
        """'better', 'worse' or 'not shown' (for `a` against `b`)."""
        if not self.significant:
            return "not shown"
        return "better" if self.by_seed.mean > 0 else "worse"

    def pair_interval(self) -> tuple[float, float]:
        """A normal 95 % interval of the mean per-node difference (nan without nodes)."""
        if self.per_pair is None or math.isnan(self.per_pair.se):
            return (float("nan"), float("nan"))
        half = 1.96 * self.per_pair.se
        return (self.per_pair.mean - half, self.per_pair.mean + half)


def paired(
    a: Mapping[int, float],
    b: Mapping[int, float],
    a_nodes: Mapping[int, Mapping[str, float]] | None = None,
    b_nodes: Mapping[int, Mapping[str, float]] | None = None,
) -> Paired:
    """Paired differences `a - b` over the seeds both have; with per-node values (seed -> node ->
    value), also over the (seed, node) pairs both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common: nothing to pair")
    by_seed = spread([a[s] - b[s] for s in seeds])
    per_pair = None
    if a_nodes is not None and b_nodes is not None:
        diffs = [a_nodes[s][n] - b_nodes[s][n] for s in seeds if s in a_nodes and s in b_nodes for n in sorted(set(a_nodes[s]) & set(b_nodes[s]))]
        per_pair = spread(diffs) if diffs else None
    return Paired(by_seed, per_pair)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy; average ranks for ties); nan when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman needs two equally long sequences of at least two values")
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence of two histograms (normalised here), base 2: 0 for equal
    distributions, 1 for disjoint supports (scipy gives the distance, its square root)."""
    if len(p) != len(q):
        raise ValueError("histograms of different lengths")
    if sum(p) <= 0 or sum(q) <= 0:
        raise ValueError("a histogram with no mass")
    return float(jensenshannon(p, q, base=2) ** 2)
