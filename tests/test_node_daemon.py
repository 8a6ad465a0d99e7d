"""Real daemon processes on loopback: a swarm run, and a client killed with SIGKILL mid-run."""

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

from p2pmoe.config import RunConfig
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.node.config import Timing
from p2pmoe.node.swarm import merge_run, run_swarm, start_node, write_node_configs
from p2pmoe.sim.runner import run_simulation

pytestmark = pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")

CFG = RunConfig(method="fedavg", data="fmnist", nodes=3, rounds=3, partition="dirichlet:0.5", max_train_per_node=300, seed=5)
METHOD_KINDS = ("model_update", "model_global")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.timeout(300)
def test_four_daemons_finish_and_match_the_simulator_to_the_byte(tmp_path):
    swarm = run_swarm(dataclasses.replace(CFG, out=str(tmp_path / "swarm")), Timing(round_deadline=60, startup=60, linger=10))
    sim = run_simulation(dataclasses.replace(CFG, out=str(tmp_path / "sim")), progress=False)

    assert swarm["exit_codes"] == {"node-00": 0, "node-01": 0, "node-02": 0, "server": 0}
    for kind in METHOD_KINDS:
        assert swarm["bytes"]["by_kind"][kind] == sim["bytes"]["by_kind"][kind]
    # Same seed, same messages, same arithmetic: the daemons learn exactly what the simulator does.
    assert swarm["metrics"] == sim["metrics"]
    rows = _rows(tmp_path / "swarm" / "metrics.jsonl")
    assert {(r["node"], r["round"]) for r in rows if r["node"] != "server"} == {
        (f"node-0{k}", r) for k in range(3) for r in range(3)
    }


@pytest.mark.timeout(300)
def test_killed_client_others_finish_and_restart_resumes_from_checkpoint(tmp_path):
    cfg = dataclasses.replace(CFG, rounds=5, out=str(tmp_path))
    timing = Timing(round_deadline=20, heartbeat=0.5, suspect_after=1.5, dead_after=3, startup=20, linger=5)
    configs = write_node_configs(cfg, tmp_path, timing)
    procs = {node: start_node(path, path.parent / "node.log") for node, path in configs.items()}
    victim = tmp_path / "nodes" / "node-02"
    started = time.monotonic()
    try:
        while not _rows(victim / "metrics.jsonl") and time.monotonic() - started < 120:
            time.sleep(0.1)
        assert _rows(victim / "metrics.jsonl"), "node-02 never finished a round"
        os.kill(procs["node-02"].pid, signal.SIGKILL)
        procs["node-02"].wait(timeout=10)
        done_before = max(r["round"] for r in _rows(victim / "metrics.jsonl"))

        # The others go on without it (the server declares it dead after `dead_after`).
        time.sleep(timing.dead_after + 1)
        procs["node-02"] = start_node(configs["node-02"], victim / "node.log")
        for node, proc in procs.items():
            assert proc.wait(timeout=180) == 0, (victim.parent / node / "node.log").read_text()[-2000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    log = (victim / "node.log").read_text()
    assert f"resumed from" in log and f"after round {done_before}" in log
    victim_rounds = [r["round"] for r in _rows(victim / "metrics.jsonl")]
    # Rounds up to the kill were not run again; the node went on from there to the end.
    assert victim_rounds == sorted(set(victim_rounds)) and victim_rounds[-1] == cfg.rounds - 1
    assert max(r for r in victim_rounds if r <= done_before) == done_before
    for node in ("node-00", "node-01", "server"):
        assert [r["round"] for r in _rows(tmp_path / "nodes" / node / "metrics.jsonl")] == list(range(cfg.rounds))
    summary = merge_run(cfg, tmp_path, time.monotonic() - started)
    assert summary["nodes_finished"] == ["node-00", "node-01", "node-02"]
