"""`p2pmoe report`: run folders in; PNGs, index.html, the tables (and a CSV) out.

`simulate` and `swarm` call `write_report` on their own folder when they finish; benchmark
scripts call the figure functions on their runs, so every picture comes from this code.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pmoe.report.folders import RunData, client_bytes_by_round, load_run, long_rows, spread_by_round
from p2pmoe.report.page import html_table, render
from p2pmoe.report.tables import format_table

LONG_COLUMNS = ["run", "round", "node", "section", "name", "value"]


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote: the page, the figure files, the CSV (if asked) and the
    terminal text of its tables."""

    index: Path
    figures: list[str]
    csv: Path | None
    text: str


def _unique_labels(runs: list[RunData]) -> None:
    """Runs from folders of the same name (alpha0.3/full/fedavg, alpha0.5/full/fedavg) are
    told apart by their parent folders."""
    counts = Counter(r.label for r in runs)
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.path.resolve().parent.name}/{run.label}"


def overview_row(run: RunData) -> dict[str, Any]:
    """The summary table's row: the selected round's metrics (mean over clients; validation
    metrics other than the headline left out) and what a client paid in bytes."""
    chosen = run.selected_round
    means = {name: mean for name in run.metric_names for r, mean, _, _ in spread_by_round(run, "metrics", name) if r == chosen}
    shown = {k: v for k, v in means.items() if k == run.headline or not k.startswith("valid_")}
    per_round = client_bytes_by_round(run)
    row: dict[str, Any] = {"run": run.label, "method": run.run_setting.get("method", "?"), "round": "" if chosen is None else chosen}
    row.update(shown)
    row["MB/client/round"] = sum(per_round.values()) / len(per_round) / 1e6 if per_round else 0.0
    row["total MB"] = sum(e.total for e in run.ledger) / 1e6
    row["wall s"] = run.summary.get("wall_seconds", "")
    return row


def per_round_rows(run: RunData) -> list[dict[str, Any]]:
    """The per-round table: the headline metric's mean and spread, the training loss,
    cumulative MB per client and simulated seconds (simulate only)."""
    metric = {r: (mean, low, high) for r, mean, low, high in spread_by_round(run, "metrics", run.headline)} if run.headline else {}
    loss = {r: mean for r, mean, _, _ in spread_by_round(run, "train", "train_loss")}
    sim = run.summary.get("sim_seconds", {}).get("by_round", [])
    rows, spent = [], 0.0
    for r, paid in sorted(client_bytes_by_round(run).items()):
        spent += paid
        mean, low, high = metric.get(r, ("", "", ""))
        rows.append(
            {
                "run": run.label,
                "round": r,
                "metric": run.headline or "",
                "mean": mean,
                "min": low,
                "max": high,
                "train_loss": loss.get(r, ""),
                "cum MB/client": spent / 1e6,
                "sim s": sim[r] if r < len(sim) else "",
            }
        )
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def default_out(paths: Sequence[str | Path]) -> Path:
    """RUN/report for one run; ./report for several."""
    return Path(paths[0]) / "report" if len(paths) == 1 else Path("report")


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, write_csv: bool = False, echo: bool = True) -> Report:
    """Read `paths` (run folders), write the figures and index.html to `out`, and with
    `write_csv` per_round.csv in long format; with `echo`, print the tables.

    Without matplotlib (the `plot` extra) the page still has every table, and the page and
    stderr say why the figures are missing."""
    if not paths:
        raise ValueError("report: no run folders given")
    runs = [load_run(p) for p in paths]
    _unique_labels(runs)
    folder = Path(out) if out is not None else default_out(paths)
    folder.mkdir(parents=True, exist_ok=True)
    notes = []
    try:
        from p2pmoe.report.figures import draw_all
    except ImportError as exc:
        figures = []
        notes.append(f"no figures: {exc} (install the plot extra: pip install 'p2pmoe[plot]')")
    else:
        figures = draw_all(runs, folder)
    overview = [overview_row(r) for r in runs]
    rounds = [row for r in runs for row in per_round_rows(r)]
    page = render(
        "p2pmoe report",
        [(r.label, str(r.path), r.setting_text()) for r in runs],
        [("summary (selected round, mean over clients)", html_table(overview, _columns(overview))), ("per round", html_table(rounds, _columns(rounds)))],
        [(f.file, f.title, f.caption) for f in figures],
        notes,
    )
    index = folder / "index.html"
    index.write_text(page)
    table_path = None
    if write_csv:
        table_path = folder / "per_round.csv"
        with open(table_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LONG_COLUMNS)
            writer.writeheader()
            for run in runs:
                writer.writerows(long_rows(run))
    text = "\n\n".join([format_table(overview, _columns(overview)), format_table(rounds, _columns(rounds))])
    for note in notes:  # even when quiet: a report without figures must say why
        print(f"report: {note}", file=sys.stderr)
    if echo:
        print(text)
        print(f"report: {index}" + (f", {table_path}" if table_path else ""))
    return Report(index, [f.file for f in figures], table_path, text)
