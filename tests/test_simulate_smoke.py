"""Real-data smoke runs: a few rounds on Fashion-MNIST through the command line."""

import csv
import json
from pathlib import Path

import pytest

from p2pmoe.cli import main
from p2pmoe.data.images import FMNIST_ROOT

pytestmark = pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data installs dataset-fashion-mnist)")

NODES, ROUNDS = 4, 3


def _run(method: str, out: Path) -> dict:
    code = main(
        [
            "simulate",
            "--method",
            method,
            "--data",
            "fmnist",
            "--nodes",
            str(NODES),
            "--rounds",
            str(ROUNDS),
            "--partition",
            "dirichlet:0.5",
            "--max-train-per-node",
            "1500",
            "--seed",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def test_fedavg_and_local_on_fashion_mnist(tmp_path):
    fedavg = _run("fedavg", tmp_path / "fedavg")
    local = _run("local", tmp_path / "local")

    for summary in (fedavg, local):
        assert summary["nodes"] == NODES and summary["rounds"] == ROUNDS and summary["seed"] == 3
        assert 0.2 < summary["metrics"]["accuracy"] <= 1.0  # chance is 0.1
        rows = [json.loads(line) for line in (tmp_path / summary["method"] / "metrics.jsonl").read_text().splitlines()]
        assert sorted((r["round"], r["node"]) for r in rows if r["node"] != "server") == sorted(
            (r, f"node-{k:02d}") for r in range(ROUNDS) for k in range(NODES)
        )
        assert all("metrics" in r and "accuracy" in r["metrics"] and "train_loss" in r["train"] for r in rows if r["node"] != "server")

    # The run's report is written at its end: on real data, at least the accuracy-vs-bytes figure.
    assert "metric_vs_bytes.png" in (tmp_path / "fedavg" / "report" / "index.html").read_text()
    assert (tmp_path / "fedavg" / "report" / "metric_vs_bytes.png").stat().st_size > 10_000

    # Every FedAvg client ends with the same global model, so global accuracy is identical.
    assert fedavg["metrics_spread"]["global_accuracy"]["std"] == 0.0
    assert local["bytes"]["total"] == 0

    with open(tmp_path / "fedavg" / "ledger.csv") as handle:
        ledger = list(csv.DictReader(handle))
    assert len(ledger) == 2 * NODES * ROUNDS
    assert sum(int(r["header_bytes"]) + int(r["payload_bytes"]) for r in ledger) == fedavg["bytes"]["total"]
    payloads = {int(r["payload_bytes"]) for r in ledger}
    assert len(payloads) == 1  # upload and download both carry the whole model
    per_client = fedavg["bytes"]["per_node_per_round"]["total"]
    assert per_client == pytest.approx(fedavg["bytes"]["total"] / NODES / ROUNDS)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["simulate", "--data", "mnist", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    assert "mnist" in capsys.readouterr().err
