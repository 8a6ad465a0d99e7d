"""The command-line flags benchmarks share: one spelling, meaning and check across bench/.

A script builds its parser with `bench_parser`, adds its own flags, then the common ones it
honours with `add_flags` (a subset: a timing bench has no seeds), and parses with
`parse_flags`, which refuses values no benchmark can use. `--only` names variants by label
or by their 1-based number in the script's list (`chosen`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pmoe.config import Values, empty_values

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
"""Where a benchmark writes its JSON, Markdown and figures unless given `--results`."""

FLAGS: dict[str, dict[str, Any]] = {
    "seeds": {"default": "0,1,2", "help": "comma-separated seeds; each variant runs once per seed"},
    "only": {"default": "", "help": "comma-separated variants to run (default: all): labels or their 1-based numbers"},
    "threads": {"type": int, "default": 1, "help": "torch threads per run"},
    "jobs": {"type": int, "default": 1, "help": "runs at once, one process each"},
    "name": {"default": "", "help": "results file stem under the results folder"},
    "results": {"type": Path, "default": RESULTS, "help": "folder for <name>.json, .md and figures"},
    "report_only": {"action": "store_true", "help": "run nothing: tables from the run folders as they are"},
    "first_rounds": {
        "type": int,
        "default": 0,
        "metavar": "N",
        "help": "with --report-only: read every run's first N rounds only, finished or not, so runs stopped at different rounds compare at one budget",
    },
    "checkpoint_every": {
        "type": int,
        "default": 0,
        "metavar": "N",
        "help": "each run checkpoints every N rounds and, run again, goes on from its folder's checkpoint; 0: never",
    },
    "resume": {"action": "store_true", "help": "take a run from its folder when it finished there with this exact setting"},
}


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring, laid out as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_flags(parser: argparse.ArgumentParser, *names: str, **defaults: Any) -> None:
    """The common flags `names` (dest spelling: "report_only"), each with its shared meaning;
    `defaults` changes a flag's default for this script (its own results stem, say)."""
    unknown = sorted(set(names) - set(FLAGS))
    if unknown:
        raise ValueError(f"no common flags {unknown}; there are {sorted(FLAGS)}")
    for name in names:
        spec = {**FLAGS[name], **({"default": defaults[name]} if name in defaults else {})}
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **spec)


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, refusing common values that mean nothing (the parser's error, exit status 2)."""
    args = parser.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        parser.error("--jobs must be at least 1")
    if getattr(args, "checkpoint_every", 0) < 0:
        parser.error("--checkpoint-every must be 0 (never) or a number of rounds")
    if getattr(args, "first_rounds", 0) < 0 or (getattr(args, "first_rounds", 0) and not getattr(args, "report_only", False)):
        parser.error("--first-rounds N (N >= 1) reads run folders: use it with --report-only")
    return args


def seed_list(args: argparse.Namespace) -> list[int]:
    """`--seeds` as numbers, each once (a repeated seed would run into the same folder)."""
    return list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s))


def chosen(parser: argparse.ArgumentParser, args: argparse.Namespace, known: Sequence[str], parts: bool = False) -> list[str]:
    """The variants `--only` names, in `known`'s order (all of them without `--only`); each is
    a label of `known` or its 1-based number, or with `parts` any text that picks every label
    containing it (long labels). One that picks nothing is the parser's error."""
    wanted = [w for w in args.only.split(",") if w]
    picked: set[str] = set()
    for w in wanted:
        hits = {known[int(w) - 1]} if w.isdigit() and 0 < int(w) <= len(known) else {k for k in known if k == w or (parts and w in k)}
        if not hits:
            parser.error(f"unknown variants ['{w}']; choose from {list(known)}")
        picked |= hits
    return [k for k in known if k in picked] if wanted else list(known)


def method_defaults(method: str, **run: Any) -> Values:
    """Experiment defaults naming `method` (and any other `[run]` value), so the parser that
    `add_experiment_arguments` builds accepts that method's own flags (--fedmoe-p, --fmoe-*)."""
    values = empty_values()
    values["run"].update(method=method, **run)
    return values
