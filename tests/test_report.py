"""`p2pmoe report`: figures, index.html and the long CSV from run folders, and the traffic
matrix against the ledger. Run folders come from tiny simulations on synthetic data (an image
method with FedMoE-DA's diagnostics, a sequence method) and from a folder written by hand."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import shlex
import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib.image
import pytest
from conftest import FIXTURE_DOMAINS, _write_domain

from p2pmoe.cli import main
from p2pmoe.config import default_config, with_options
from p2pmoe.report import load_run, rerun_command, write_report
from p2pmoe.report.folders import load_runs, traffic_matrix
from p2pmoe.report.seeds import seeds_table
from p2pmoe.sim.runner import run_simulation

ACROSS = [
    "metric_vs_bytes_accuracy.png",
    "metric_vs_bytes_valid_mrr.png",
    "metrics_per_round.png",
    "train_loss.png",
    "bytes_by_kind.png",
    "traffic_matrix.png",
    "sim_time.png",
]


def _mnist_csv(path: Path, per_class: int = 12) -> Path:
    """A synthetic mnist_5k.csv.gz: each class a constant image plus a stripe (unit test only)."""
    rows = []
    for c in range(10):
        for k in range(per_class):
            pixels = [(c * 23 + k) % 256] * 784
            pixels[c * 70 : c * 70 + 28] = [255] * 28
            rows.append(",".join(map(str, [*pixels, c])))
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two run folders: FedMoE-DA on images (report written by the run itself) and
    FedSASRec on a three-domain sequence fixture (report turned off)."""
    root = tmp_path_factory.mktemp("runs")
    image = with_options(
        default_config(
            method="fedmoe-da",
            data="mnist5k",
            data_root=str(_mnist_csv(root / "mnist_5k.csv.gz")),
            nodes=3,
            rounds=2,
            partition="iid",
            topology="ring",
            threads=1,
            out=str(root / "image"),
        ),
        task_options={"experts": 2, "embed_dim": 8, "expert_hidden": 8},
        method_options={"p": 1},
    )
    run_simulation(image, progress=False)
    for seed, (name, items) in enumerate(FIXTURE_DOMAINS.items()):
        _write_domain(root / "fkcb" / name, items, seed)
    sequence = with_options(
        default_config(method="fedsasrec", data="fkcb", data_root=str(root / "fkcb"), rounds=2, threads=1, out=str(root / "sequence")),
        task_options={"embed_dim": 8, "max_len": 8, "negatives": 20, "blocks": 1, "heads": 1},
    )
    run_simulation(sequence, progress=False, report=False)
    return {"image": root / "image", "sequence": root / "sequence"}


def _is_picture(path: Path) -> None:
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300, f"{path.name}: {pixels.shape}"
    assert pixels.std() > 0.01, f"{path.name} is blank"


def test_report_of_an_image_and_a_sequence_run(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs["image"]), str(runs["sequence"]), "--out", str(out), "--csv"]) == 0
    expected = ACROSS + ["expert_graph_image.png", "gate_correlation_image.png"]
    page = (out / "index.html").read_text()
    for name in expected:
        _is_picture(out / name)
        assert f"src='{name}'" in page
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    assert "ring" in page and "fedsasrec, data fkcb" in page  # captions name the setting

    printed = capsys.readouterr().out
    assert "valid_mrr" in printed and "accuracy" in printed and "cum MB/client" in printed

    with open(out / "per_round.csv", newline="") as handle:
        long = list(csv.DictReader(handle))
    rows = [json.loads(line) for folder in runs.values() for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(long) == sum(len(r["train"]) + len(r.get("metrics", {})) + 2 for r in rows)
    assert {r["section"] for r in long} == {"train", "metrics", "bytes"}
    one = next(r for r in long if r["run"] == "sequence" and r["name"] == "valid_mrr" and r["round"] == "1" and r["node"] == "node-00")
    row = next(r for r in rows if "valid_mrr" in r.get("metrics", {}) and r["round"] == 1 and r["node"] == "node-00")
    assert float(one["value"]) == pytest.approx(row["metrics"]["valid_mrr"])


@pytest.mark.slow  # draws a whole report of six runs
def test_runs_repeated_over_seeds_get_a_paired_table_and_a_spread_figure(runs, tmp_path):
    """Issue 31: `p2pmoe report` of one experiment per method over seeds groups the folders by
    their setting without the seed and compares the groups pairwise by seed."""
    accuracy = {"fedmoe-da": (0.50, 0.51, 0.52), "local": (0.40, 0.43, 0.41)}
    folders = []
    for method, values in accuracy.items():
        for seed, value in enumerate(values):
            folder = tmp_path / method / f"seed{seed}"
            shutil.copytree(runs["image"], folder, ignore=shutil.ignore_patterns("report"))
            summary = json.loads((folder / "summary.json").read_text())
            summary["setting"]["run"].update(seed=seed, method=method, threads=1 + seed)  # how a run ran does not split a group
            summary["metrics"]["accuracy"] = value
            for node in summary["per_node"].values():
                node["accuracy"] = value
            (folder / "summary.json").write_text(json.dumps(summary))
            folders.append(folder)
    found = seeds_table(load_runs(folders))
    assert found is not None
    heading, rows = found
    assert "accuracy" in heading and [(r["method"], r["seeds"]) for r in rows] == [("fedmoe-da", 3), ("local", 3)]
    assert rows[1]["fedmoe-da − this"] == pytest.approx(0.0967, abs=1e-4) and rows[1]["verdict"] == "better"
    assert seeds_table(load_runs(folders[::3])) is None  # one seed per method: nothing to say over seeds
    report = write_report(folders, tmp_path / "report", echo=False)
    assert "seeds.png" in report.figures and "over seeds" in report.index.read_text()
    _is_picture(tmp_path / "report" / "seeds.png")


def test_simulate_writes_its_report_unless_told_not_to(runs):
    assert (runs["image"] / "report" / "index.html").exists()
    assert (runs["image"] / "report" / "expert_graph_image.png").exists()
    assert not (runs["sequence"] / "report").exists()


def test_traffic_matrix_is_the_ledger(runs):
    for folder in runs.values():
        with open(folder / "ledger.csv", newline="") as handle:
            ledger = list(csv.DictReader(handle))
        expected: dict[tuple[str, str], int] = defaultdict(int)
        for r in ledger:
            expected[(r["src"], r["dst"])] += int(r["header_bytes"]) + int(r["payload_bytes"])
        nodes, matrix = traffic_matrix(load_run(folder).ledger)
        got = {(nodes[i], nodes[j]): v for i, row in enumerate(matrix) for j, v in enumerate(row) if v}
        assert got == dict(expected) and got
        # A node's row is what it sent over the run, as its metrics lines count it.
        sent: dict[str, int] = defaultdict(int)
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            sent[row["node"]] += row["bytes_sent"]
        assert {n: sum(matrix[i]) for i, n in enumerate(nodes)} == {n: v for n, v in sent.items() if v or n in nodes}


def _hand_made(folder: Path) -> None:
    """A LAN run gathered by hand: per-node folders without summary.json, FeDecider-style
    alpha metrics and an FMoE-CDSR-style gate."""
    for k, node in enumerate(["node-00", "node-01"]):
        part = folder / node
        part.mkdir(parents=True)
        lines = []
        for r in range(3):
            metrics = {"mrr": 0.1 * r + k, "gate_mean/0": 0.7 - 0.1 * k, "gate_mean/1": 0.3 + 0.1 * k, "alpha/0": 0.5, "alpha/1": 0.5}
            row = {"round": r, "node": node, "train": {"train_loss": 1.0 / (r + 1)}, "metrics": metrics, "bytes_sent": 100, "bytes_received": 100}
            lines.append(json.dumps(row))
        (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        other = "node-01" if k == 0 else "node-00"
        (part / "ledger.csv").write_text(
            "round,src,dst,kind,header_bytes,payload_bytes,phase\n" + "".join(f"{r},{node},{other},expert,10,90,0\n" for r in range(3))
        )


def test_gathered_lan_folders_and_gate_heatmaps(tmp_path):
    _hand_made(tmp_path / "lan")
    report = write_report([tmp_path / "lan"], echo=False)
    assert report.index == tmp_path / "lan" / "report" / "index.html"
    for name in ("gate_mean_lan.png", "alpha_lan.png", "metric_vs_bytes.png", "traffic_matrix.png", "bytes_by_kind.png"):
        assert name in report.figures
        _is_picture(tmp_path / "lan" / "report" / name)
    assert "sim_time.png" not in report.figures  # no simulated time outside simulate
    assert "gate_mean/0" not in report.text.split("\n")[0]  # gate weights are pictures, not summary columns
    run = load_run(tmp_path / "lan")
    assert run.headline == "mrr" and run.selected_round == 2 and len(run.ledger) == 6


def test_a_folder_that_is_no_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_swarm_progress_reads_the_nodes_lines_and_skips_a_half_written_one(tmp_path):
    from p2pmoe.node.swarm import _progress

    _hand_made(tmp_path / "nodes")
    with open(tmp_path / "nodes" / "node-01" / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 3, "node": "node-01", "metr')  # a line still being written
    done, post = _progress(tmp_path, "mrr")
    assert done == 6 and post == {"MB": "0.0", "mrr": f"{(0.2 + 1.2) / 2:.4f}"}


def test_without_matplotlib_the_page_keeps_its_tables_and_says_why(tmp_path, monkeypatch, capsys):
    import sys

    _hand_made(tmp_path / "lan")
    monkeypatch.setitem(sys.modules, "p2pmoe.report.figures", None)  # as if the plot extra were missing
    report = write_report([tmp_path / "lan"], echo=False)
    page = report.index.read_text()
    assert report.figures == [] and "<table>" in page and "plot extra" in page
    assert "plot extra" in capsys.readouterr().err


def test_rerun_command_writes_switches_bare_and_only_when_set():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(["--report-only"])
    assert rerun_command("bench/x.py", args, parser=parser) == "python bench/x.py --rounds 3 --report-only"


def test_rerun_command_quotes_values_so_the_line_parses_back():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(["--only", "φ gossip all", "--rounds", "5"])
    line = rerun_command("bench/x.py", args, parser=parser)
    assert line == "python bench/x.py --only 'φ gossip all' --rounds 5"
    assert parser.parse_args(shlex.split(line)[2:]) == args
