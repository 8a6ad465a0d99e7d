"""Issue 29: `p2pmoe report` takes a LAN run's per-node folders as they are: the setting, the
wall time, who ran which rounds, and a per-node timeline with the peers lost, from the
daemons' own node.json files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from stub_methods import Idle

from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.node.config import NodeConfig, Timing
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.swarm import free_ports
from p2pmoe.report import write_report

ROUNDS = 6


class Steady(Idle):
    """Rounds of a quarter second; with `stop_after`, the node leaves during that round."""

    seconds = 0.25

    def __init__(self, node_id: str, stop_after: int | None = None, daemon: list | None = None) -> None:
        super().__init__(node_id)
        self.stop_after, self.daemon = stop_after, daemon

    def train_local(self, round_index: int) -> dict[str, float]:
        if self.stop_after is not None and round_index == self.stop_after and self.daemon:
            self.daemon[0]._stop.set()  # this node leaves after this round, for good
        return {**super().train_local(round_index), "train_loss": 1.0 / (round_index + 1)}


@pytest.mark.slow
def test_a_lan_runs_node_folders_make_one_report_with_its_timeline(tmp_path: Path):
    experiment = resolve_experiment(default_config(method="gossip", nodes=4, topology="ring", rounds=ROUNDS))
    ids = list(experiment.clients)
    addresses = {n: f"tcp://127.0.0.1:{p}" for n, p in zip(ids, free_ports(4), strict=True)}
    links = experiment.links()
    timing = Timing(round_deadline=10, heartbeat=0.1, suspect_after=0.4, dead_after=0.8, startup=10, linger=0.5)
    holder: list = []
    daemons = {}
    for n in ids:
        method = Steady(n, stop_after=1, daemon=holder) if n == "node-03" else Steady(n)
        daemons[n] = NodeDaemon(NodeConfig(n, addresses[n], tmp_path / "lan" / n, {p: addresses[p] for p in links[n]}, experiment, timing), method)
    holder.append(daemons["node-03"])

    async def scenario() -> None:
        await asyncio.gather(*(d.run() for d in daemons.values()))

    asyncio.run(scenario())
    node_file = json.loads((tmp_path / "lan" / "node-00" / "node.json").read_text())
    assert node_file["setting"]["run"]["topology"] == "ring" and node_file["finished"] >= node_file["started"]
    assert {"peer": "node-03", "event": "lost"}.items() <= next(e for e in node_file["events"] if e["peer"] == "node-03").items()

    folders = [tmp_path / "lan" / n for n in ids]  # given one by one, as `p2pmoe report runs/node-*` does
    report = write_report([str(f) for f in folders], tmp_path / "report", echo=False)
    page = report.index.read_text()
    assert "timeline_lan_LAN_4_nodes.png" in report.figures
    assert "gossip" in report.text.split("\n")[2]  # the method, not "?"
    assert "node-03  rounds 0 of 0-5" in page and "node-00  rounds 0-5 of 0-5" in page  # node-03 left during round 1
    assert "topology ring" in page and "lan" in page and "min wall" in page
