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

from p2pmoe.report.folders import RunData, client_bytes_by_round, load_runs, long_rows, run_labels, spread_by_round
from p2pmoe.report.page import html_table, render
from p2pmoe.report.seeds import seeds_table
from p2pmoe.report.tables import columns_of, format_table, participation_lines, profile_lines, random_ranking_rows

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


def _selected_means(run: RunData, names: list[str]) -> dict[str, float]:
    """name -> mean over clients in the selected round, of the `names` evaluated then."""
    chosen = run.selected_round
    return {name: mean for name in names for r, mean, _, _ in spread_by_round(run, "metrics", name) if r == chosen}


def overview_row(run: RunData, label: str | None = None) -> dict[str, Any]:
    """The summary table's row: the run (`label`: its label and how it differs from the runs
    beside it), its method and model, the selected round's metrics (mean over clients and
    domains; validation metrics other than the headline left out: per-domain values are
    `domain_rows`') and what a client paid in bytes."""
    chosen = run.selected_round
    names = [n for n in run.mean_metrics if n == run.headline or not n.startswith("valid_")]
    per_round = client_bytes_by_round(run)
    row: dict[str, Any] = {"run": label or run.label, "method": run.run_setting.get("method", "?")}
    model = run.summary.get("setting", {}).get("task", {}).get("model")
    if model is not None:  # a method trains whichever model the task's --model names
        row["model"] = model
    row["round"] = "" if chosen is None else chosen
    row.update(_selected_means(run, names))
    row["MB/client/round"] = sum(per_round.values()) / len(per_round) / 1e6 if per_round else 0.0
    row["total MB"] = sum(e.total for e in run.ledger) / 1e6
    row["wall s"] = run.summary.get("wall_seconds", "")
    return row


def domain_rows(run: RunData) -> list[dict[str, Any]]:
    """The per-domain table's rows: one per domain (or task) of a run whose metrics have a
    breakdown, the selected round's mean over clients of each metric."""
    parts: dict[str, dict[str, Any]] = {}
    for metric in run.mean_metrics:
        names = run.parts_of(metric)
        means = _selected_means(run, list(names.values()))
        for part, name in names.items():
            if name in means:
                parts.setdefault(part, {})[metric] = means[name]
    return [{"run": run.label, "domain": part, **values} for part, values in sorted(parts.items())]


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
    runs = load_runs(paths)
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
    labels = run_labels(runs)
    overview = [overview_row(r, label) for r, label in zip(runs, labels, strict=True)]
    overview += random_ranking_rows([r.summary for r in runs], columns_of(overview), "run")
    said = []  # what the runs said of their data and their selection (printed when they ran): the page repeats it
    for run, label in zip(runs, labels, strict=True):
        said += [f"{label}: {line}" for line in profile_lines(run.summary.get("data_profile", {}))]
        warning = run.summary.get("selection", {}).get("warning")
        if warning:
            said.append(f"{label}: warning: {warning}")
        if "took_part" in run.summary:  # a swarm or LAN run: which node ran which rounds, and what failed
            said += [f"{label}: {line}" for line in participation_lines(run.summary["took_part"], int(run.summary.get("rounds", 0)))]
            said += [f"{label}: {node} failed: {'; '.join(why)}" for node, why in sorted(run.summary.get("failures", {}).items())]
    domains = [row for r in runs for row in domain_rows(r)]
    rounds = [row for r in runs for row in per_round_rows(r)]
    tables = [("summary (selected round, mean over clients and domains)", overview)]
    if domains:
        tables.append(("per domain (selected round, mean over clients)", domains))
    over_seeds = seeds_table(runs)
    if over_seeds is not None:
        tables.append(over_seeds)
    page = render(
        "p2pmoe report",
        [(label, str(r.path), r.setting_text()) for r, label in zip(runs, labels, strict=True)],
        [(heading, html_table(rows, columns_of(rows))) for heading, rows in tables],
        [(f.file, f.title, f.caption) for f in figures],
        [*notes, *said],
        [("per round", html_table(rounds, columns_of(rounds)))],
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
    later = [f"{heading}:\n{format_table(rows, columns_of(rows))}" for heading, rows in [*tables[1:], ("per round", rounds)]]
    text = "\n\n".join([format_table(overview, columns_of(overview)), *later])  # the first line is the summary's header
    for note in notes:  # even when quiet: a report without figures must say why
        print(f"report: {note}", file=sys.stderr)
    if echo:
        print(text)
        print(f"report: {index}" + (f", {table_path}" if table_path else ""))
    return Report(index, [f.file for f in figures], table_path, text)
