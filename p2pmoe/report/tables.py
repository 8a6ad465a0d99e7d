"""Results tables and benchmark rows, shared by the command line, bench/ scripts and reports."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A table cell: floats to 4 decimals, integers with thousands separators."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table with right-aligned numbers, for terminals and READMEs alike."""
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The columns every results table shows for one run."""
    return {
        "method": summary["method"],
        **summary["metrics"],
        "MB/node/round": summary["bytes"]["per_node_per_round"]["total"] / 1e6,
        "total MB": summary["bytes"]["total"] / 1e6,
        "wall s": summary["wall_seconds"],
    }


def bench_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The row bench/results/<benchmark>.json keeps for one run: method, data, metrics,
    bytes (totals and per node per round, by message kind) and the full setting."""
    return {
        "method": summary["method"],
        "data": summary["data"],
        "metrics": summary["metrics"],
        "metrics_spread": summary["metrics_spread"],
        "bytes": summary["bytes"],
        "wall_seconds": summary["wall_seconds"],
        "setting": summary["setting"],
    }


LOCAL_PLACEHOLDERS = {"run.data_root": "DIR"}
"""Options whose value is a path of the machine that ran the command, and what stands for it."""


def rerun_command(script: str, args: argparse.Namespace, skip: Iterable[str] = (), parser: argparse.ArgumentParser | None = None) -> str:
    """The command line that reruns a benchmark with the options it was given (for its .md).

    With `parser`, each option is written as the flag that sets it (dest `method.p` is
    `--fedmoe-p`); without, as its dest with dashes and without the section (`run.batch_size`
    is `--batch-size`), which is wrong for a method option whose flags carry a prefix.
    `skip` names dests to leave out. Values are shell-quoted, so a value with spaces (an
    `--only` label such as "φ gossip all") pastes back as one argument. A path of this
    machine (`LOCAL_PLACEHOLDERS`, the data root) is written as a placeholder: it means
    nothing elsewhere and must not be committed."""
    flags: dict[str, str] = {}
    switches: set[str] = set()  # store_true options: the bare flag when set, nothing when not
    if parser is not None:
        for action in parser._actions:
            long = [s for s in action.option_strings if s.startswith("--")]
            if long:
                flags.setdefault(action.dest, long[0])
            if isinstance(action, argparse._StoreTrueAction):
                switches.add(action.dest)
    skipped = set(skip)
    given = []
    for k, v in vars(args).items():
        if v in (None, "") or k in skipped or (k in switches and v is False):
            continue
        flag = flags.get(k) or "--" + k.rsplit(".", 1)[-1].replace("_", "-")
        v = LOCAL_PLACEHOLDERS.get(k, v)
        given.append(flag if k in switches else f"{flag} {shlex.quote(str(v))}")
    return " ".join([f"python {script}", *given])
