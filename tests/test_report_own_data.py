"""Reports on a user's own cross-domain runs: timelines metrics (means and per-domain values),
runs that differ in a task option only (`--model`), and figures that must stay readable.
Run folders are written by hand, as a timelines `simulate` writes them, so nothing trains."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pmoe.report import figures as figures_module
from p2pmoe.report import load_run, write_report

DOMAINS = ("books", "electronics", "toys")
METRICS = ("mrr", "hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10")
ROUNDS = 3


def _metrics(round_index: int, shift: float) -> dict[str, float]:
    """A timelines client's metrics line: means, each domain's values and validation means."""
    base = {name: 0.1 + 0.05 * round_index + 0.01 * k + shift for k, name in enumerate(METRICS)}
    per_domain = {f"{d}/{name}": value + 0.001 * j for j, d in enumerate(DOMAINS) for name, value in base.items()}
    return {**base, **per_domain, **{f"valid_{name}": value for name, value in base.items()}}


def _timelines_run(folder: Path, model: str = "syncrec", lr: float = 0.001, method_options: dict[str, Any] | None = None) -> Path:
    """A two-node timelines run folder (metrics, ledger, summary) over ROUNDS rounds."""
    folder.mkdir(parents=True)
    shift = {"syncrec": 0.0, "sasrec-single": -0.02, "sasrec-cross": -0.01}[model]
    rows = [
        {"round": r, "node": node, "train": {"train_loss": 3.0 - r}, "bytes_sent": 1000, "bytes_received": 1000, "metrics": _metrics(r, shift)}
        for r in range(ROUNDS)
        for node in ("node-00", "node-01")
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ledger = "".join(
        f"{r},node-00,node-01,{kind},100,{size},0\n" for r in range(ROUNDS) for kind, size in (("model_update", 900_000), ("model_global", 4_000_000))
    )
    (folder / "ledger.csv").write_text("round,src,dst,kind,header_bytes,payload_bytes,phase\n" + ledger)
    setting = {
        "run": {
            "method": "local",
            "data": "atomic-timelines",
            "nodes": 2,
            "partition": "dirichlet:0.5",
            "rounds": ROUNDS,
            "lr": lr,
            "seed": 0,
            "topology": "full",
            "out": str(folder),
        },
        "task": {"model": model, "domain_field": "category", "embed_dim": 32, "negatives": 20},
        "method": method_options or {},
    }
    summary = {
        "method": "local",
        "data": "atomic-timelines",
        "driver": "simulate",
        "selection": {"key": "valid_mrr", "round": ROUNDS - 1},
        "metrics": rows[-1]["metrics"],
        "bytes": {"total": 14_700_000, "per_node_per_round": {"total": 4_900_000.0}},
        "wall_seconds": 12.5,
        "setting": setting,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The report's figures as matplotlib saved them, by title, kept open for inspection."""
    kept: dict[str, Any] = {}
    monkeypatch.setattr(figures_module.plt, "close", lambda fig: kept.setdefault(fig._suptitle.get_text(), fig))
    yield kept
    monkeypatch.undo()
    for fig in kept.values():
        figures_module.plt.close(fig)


def _panel_titles(fig: Any) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_visible()]


def _legend(fig: Any) -> list[str]:
    """The runs' legend of a figure, labels unwrapped."""
    return [" ".join(t.get_text().split()) for legend in fig.legends for t in legend.get_texts()]


def test_metrics_per_round_plots_the_mean_test_metrics_and_domains_apart(tmp_path, drawn):
    report = write_report([_timelines_run(tmp_path / "r_syn")], tmp_path / "report", echo=False)
    assert _panel_titles(drawn["metrics per round"]) == ["valid_mrr", *METRICS]
    assert "metrics_per_domain.png" in report.figures
    assert _panel_titles(drawn["mrr per domain"]) == [f"{d}/mrr" for d in DOMAINS]


def test_labels_and_captions_name_every_option_on_which_runs_differ(tmp_path, drawn):
    folders = [
        _timelines_run(tmp_path / "r_syn"),
        _timelines_run(tmp_path / "r_sas", "sasrec-single"),
        _timelines_run(tmp_path / "r_cross", "sasrec-cross", lr=0.01),
    ]
    labels = ["r_syn (lr=0.001, model=syncrec)", "r_sas (lr=0.001, model=sasrec-single)", "r_cross (lr=0.01, model=sasrec-cross)"]
    report = write_report(folders, tmp_path / "report", echo=False)

    assert _legend(drawn["metrics per round"]) == labels
    assert _panel_titles(drawn["bytes per round by message kind"]) == labels
    header, _, *summary_rows = report.text.split("\n\n")[0].splitlines()
    assert header.split()[:4] == ["run", "method", "model", "round"]
    assert [row.strip()[: len(label)] for row, label in zip(summary_rows, labels, strict=True)] == labels
    page = report.index.read_text()
    for label in labels:
        assert f"<b>{label}</b>" in page
        assert label in page.split("<figcaption>")[1]  # captions say how the runs differ, not only that they do
    assert "local, model sasrec-single, data atomic-timelines" in load_run(folders[1]).setting_text()


def test_tables_show_mean_metrics_first_and_domains_in_a_second_table(tmp_path):
    from p2pmoe.report.tables import summary_tables  # what `simulate` prints at the end

    folder = _timelines_run(tmp_path / "r_syn")
    summary = json.loads((folder / "summary.json").read_text())

    means, domains = summary_tables([summary]).split("\n\nper domain:\n")
    header = means.splitlines()[0].split()
    ordered = ["hr@1", "hr@5", "hr@10", "mrr", "ndcg@1", "ndcg@5", "ndcg@10"]
    assert header == ["method", *ordered, *(f"valid_{m}" for m in ordered), "MB/node/round", "total", "MB", "wall", "s"]
    lines = domains.splitlines()
    assert lines[0].split() == ["method", "domain", *ordered] and len(lines) == 2 + len(DOMAINS)
    assert lines[2].split()[:3] == ["local", "books", f"{summary['metrics']['books/hr@1']:.4f}"]

    report = write_report([folder], tmp_path / "report", echo=False)
    header = report.text.splitlines()[0].split()
    assert [*header[4:12], *header[-5:]] == [*ordered, "valid_mrr", "MB/client/round", "total", "MB", "wall", "s"]
    per_domain = report.text.split("per domain (selected round, mean over clients):\n")[1].split("\n\n")[0].splitlines()
    assert per_domain[0].split() == ["run", "domain", *ordered] and len(per_domain) == 2 + len(DOMAINS)
    page = report.index.read_text()
    assert page.index("per domain") < page.index("<figure>") and "books/mrr" not in page.split("<figure>")[0]


def test_bytes_by_kind_keeps_its_caption_inside_and_ticks_whole_rounds(tmp_path, drawn):
    # Capitals and `=` are wider than the average character a count of characters per inch assumes.
    wide = {
        "gate": "MMoE",
        "experts": "MoE-W",
        "MODE": "WWW_MMM",
        "NORM": "MAX_MEAN",
        "GRAPH": "WEIGHTED",
        "ROUNDS": "0000,1111,2222",
        "Q": "MMMM",
        "W": "MMMM",
    }
    run = load_run(_timelines_run(tmp_path / "r_fmoe", method_options=wide))
    (saved,) = figures_module.bytes_per_round([run], tmp_path)
    fig = drawn["bytes per round by message kind"]

    (ax,) = [a for a in fig.axes if a.get_visible()]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [0, 1, 2]
    renderer = fig.canvas.get_renderer()
    (caption,) = [t for t in fig.texts if t is not fig._suptitle]
    assert " ".join(caption.get_text().split()) == saved.caption  # wrapped, never cut
    inside = fig.bbox
    box = caption.get_window_extent(renderer)
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (box, inside)
    assert ax.get_window_extent(renderer).y0 > box.y1  # the caption is below the plot, not over it
