"""Issue 29: a run that did not do what was asked is visible: the node says what and exits
non-zero, and a swarm ends with who took part in which rounds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from p2pmoe.cli import main
from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.node.config import NodeConfig, Timing, load_node_config
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.swarm import free_ports
from p2pmoe.report.tables import participation_lines, round_ranges

QUICK = Timing(round_deadline=1, heartbeat=0.1, suspect_after=0.3, dead_after=0.6, startup=0.5, linger=0.1)


def test_round_ranges_and_the_participation_table():
    assert [round_ranges(r) for r in ([0, 1, 2, 5, 7, 8, 9], [3], [], [0, 2, 4])] == ["0-2, 5, 7-9", "3", "none", "0, 2, 4"]
    assert participation_lines({"server": "0-4", "node-01": "0-1, 3-4"}, 5) == ["node-01  rounds 0-1, 3-4 of 0-4", "server   rounds 0-4 of 0-4"]


def test_a_node_that_never_reached_a_peer_or_ran_short_of_peers_says_so(tmp_path: Path):
    (port, silent) = free_ports(2)
    cfg = NodeConfig(
        "node-00",
        f"tcp://127.0.0.1:{port}",
        tmp_path / "n",
        {"node-01": f"tcp://127.0.0.1:{silent}"},
        resolve_experiment(default_config(method="local", rounds=2)),
        QUICK,
        min_peers=1,
    )
    daemon = NodeDaemon(cfg)
    asyncio.run(daemon.run())
    assert daemon.failures == [
        "never reached configured peer(s) node-01: check their addresses, ports and keys",
        "ran rounds 0-1 with fewer than min_peers = 1 live peers",
    ]


def test_the_node_command_exits_non_zero_with_the_reasons(tmp_path: Path, capsys):
    (port, silent) = free_ports(2)
    path = tmp_path / "node.toml"
    path.write_text(
        f'node_id = "node-00"\nbind = "tcp://127.0.0.1:{port}"\nout = "out"\n[peers]\nnode-01 = "tcp://127.0.0.1:{silent}"\n'
        "[timing]\nround_deadline = 1.0\nheartbeat = 0.1\nsuspect_after = 0.3\ndead_after = 0.6\nstartup = 0.5\nlinger = 0.1\n"
        '[run]\nmethod = "local"\nrounds = 1\n'
    )
    assert main(["node", "--config", str(path)]) == 1
    assert "p2pmoe: node 'node-00': never reached configured peer(s) node-01" in capsys.readouterr().err
    path.write_text(path.read_text().replace('out = "out"\n', 'out = "out"\nmin_peers = 2\n'))
    with pytest.raises(ValueError, match="min_peers must be a whole number from 0 to the 1 configured peers"):
        load_node_config(path)
