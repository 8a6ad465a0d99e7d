"""Issue 29 item 3: nodes that join or leave a running swarm (`[run] churn`), the same
schedule in the simulator and in real daemons."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.experiment import resolve_experiment
from p2pmoe.participation import Participation, parse_churn

CONTROL = {"hello", "heartbeat", "error", "roster", "status"}


def test_a_churn_schedule_says_when_each_node_exists():
    windows = parse_churn("node-05:join@3, node-02:leave@5,node-01:join@1,node-01:leave@4")
    assert windows == {"node-05": (3, None), "node-02": (0, 5), "node-01": (1, 4)}
    clients = [f"node-0{k}" for k in range(6)]
    part = Participation(0, 1.0, clients, "availability", windows)
    assert [r for r in range(7) if part.takes_part("node-05", r)] == [3, 4, 5, 6]
    assert [r for r in range(7) if part.takes_part("node-02", r)] == [0, 1, 2, 3, 4]
    assert [r for r in range(7) if part.takes_part("node-01", r)] == [1, 2, 3]
    assert all(part.takes_part("node-00", r) for r in range(7)) and not part.everyone
    for bad, why in [
        ("node-05:arrive@3", "NODE:join@ROUND"),
        ("node-05:join@3,node-05:join@4", "two join"),
        ("node-02:join@5,node-02:leave@5", "before it leaves"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_churn(bad)
    with pytest.raises(ValueError, match="not clients of this run"):
        resolve_experiment(default_config(nodes=4, churn="node-07:join@2"))
    with pytest.raises(ValueError, match="within the run's rounds 0..19"):
        resolve_experiment(default_config(nodes=4, churn="node-01:leave@20"))


def _kinds(ledger: Path) -> Counter:
    """Bytes per message kind of the method's own messages (the daemons' control traffic has no simulated twin)."""
    import csv

    counts: Counter = Counter()
    for row in csv.DictReader(ledger.open()):
        if row["kind"] not in CONTROL:
            counts[row["kind"]] += int(row["header_bytes"]) + int(row["payload_bytes"])
    return counts


def _rounds(path: Path) -> list[int]:
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_a_node_joins_at_round_3_and_another_leaves_at_round_5_in_a_swarm_as_in_the_simulator(tmp_path):
    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import merge_run, start_node, write_node_configs
    from p2pmoe.sim.runner import run_simulation

    base = default_config(
        method="fedmoe-da", data="fmnist", nodes=6, topology="ring", rounds=7, max_train_per_node=100, seed=3, churn="node-05:join@3,node-02:leave@5"
    )
    base = with_options(base, task_options={"global_test_size": 50})
    run_simulation(with_options(base, out=str(tmp_path / "sim")), progress=False, report=False)

    experiment = resolve_experiment(with_options(base, out=str(tmp_path / "swarm")))
    configs = write_node_configs(experiment, tmp_path / "swarm", Timing(round_deadline=60, heartbeat=0.5, startup=60, linger=3))
    procs = {node: start_node(path, path.parent / "node.log") for node, path in configs.items() if node != "node-05"}
    try:
        first = tmp_path / "swarm" / "nodes" / "node-00" / "metrics.jsonl"
        deadline = time.monotonic() + 200
        while max(_rounds(first), default=-1) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert max(_rounds(first), default=-1) >= 2
        procs["node-05"] = start_node(configs["node-05"], configs["node-05"].parent / "node.log")  # the newcomer arrives now
        codes = {node: proc.wait(timeout=240) for node, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert codes == dict.fromkeys(procs, 0), {n: (tmp_path / "swarm" / "nodes" / n / "node.log").read_text()[-1500:] for n, c in codes.items() if c}
    merge_run(experiment, tmp_path / "swarm", 0.0)
    nodes = tmp_path / "swarm" / "nodes"
    assert _rounds(nodes / "node-05" / "metrics.jsonl") == [3, 4, 5, 6]  # its metrics start at its first round
    assert _rounds(nodes / "node-02" / "metrics.jsonl") == [0, 1, 2, 3, 4]  # gone for good from round 5
    assert _rounds(nodes / "node-00" / "metrics.jsonl") == list(range(7))
    simulated, swarmed = _kinds(tmp_path / "sim" / "ledger.csv"), _kinds(tmp_path / "swarm" / "ledger.csv")
    assert swarmed == simulated and {"gate_publish", "expert_response"} <= set(swarmed)


def test_the_simulator_neither_evaluates_nor_logs_a_node_outside_its_window_and_samples_only_present_clients(tmp_path):
    from p2pmoe.sim.runner import run_simulation

    clients = [f"node-0{k}" for k in range(6)]
    part = Participation(0, 0.5, clients, "sample", parse_churn("node-00:leave@1,node-01:leave@1,node-02:leave@1"))
    assert len(part.sampled(3)) == 1 and part.sampled(3) <= {"node-03", "node-04", "node-05"}  # m = floor(0.5 x 3 present)
    cfg = default_config(method="local", data="fmnist", nodes=3, rounds=3, max_train_per_node=32, churn="node-01:join@1,node-02:leave@2", out=str(tmp_path))
    if not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (make data)")
    run_simulation(with_options(cfg, task_options={"global_test_size": 20}), progress=False, report=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["node"], r["round"]) for r in rows) == [
        ("node-00", 0),
        ("node-00", 1),
        ("node-00", 2),
        ("node-01", 1),
        ("node-01", 2),
        ("node-02", 0),
        ("node-02", 1),
    ]
