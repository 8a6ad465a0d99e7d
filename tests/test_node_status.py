"""Issue 29 item 4: `p2pmoe status` asks a live node over the protocol's `status` kind."""

from __future__ import annotations

import asyncio
from pathlib import Path

from stub_methods import Idle

from p2pmoe.cli import main
from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.node.config import NodeConfig, Timing
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.status import ask_status
from p2pmoe.node.swarm import free_ports


class Slow(Idle):
    seconds = 0.4


def test_status_of_a_live_node_and_of_a_roster(tmp_path: Path, capsys):
    a, b, nobody = free_ports(3)
    addresses = {"node-00": f"tcp://127.0.0.1:{a}", "node-01": f"tcp://127.0.0.1:{b}"}
    timing = Timing(round_deadline=10, heartbeat=0.2, suspect_after=1, dead_after=3, startup=10, linger=1)
    experiment = resolve_experiment(default_config(method="local", nodes=2, rounds=4))
    daemons = {
        n: NodeDaemon(NodeConfig(n, addresses[n], tmp_path / n, {p: x for p, x in addresses.items() if p != n}, experiment, timing), Slow(n)) for n in addresses
    }
    roster = tmp_path / "roster.toml"
    roster.write_text(f'[nodes]\nnode-00 = "{addresses["node-00"]}"\nnode-01 = "{addresses["node-01"]}"\nghost = "tcp://127.0.0.1:{nobody}"\n')
    seen: dict = {}

    async def ask() -> None:
        while daemons["node-00"].rounds_done < 1:
            await asyncio.sleep(0.05)
        seen["status"] = await asyncio.to_thread(ask_status, addresses["node-00"])
        seen["code"] = await asyncio.to_thread(main, ["status", "--roster", str(roster), "--timeout", "1"])
        seen["swarm_out"] = capsys.readouterr().out
        seen["swarm"] = await asyncio.to_thread(main, ["status", "--swarm", addresses["node-01"], "--timeout", "1"])

    async def scenario() -> None:
        await asyncio.gather(*(d.run() for d in daemons.values()), ask())

    asyncio.run(scenario())
    status = seen["status"]
    assert status["node"] == "node-00" and status["method"] == "local" and status["rounds_done"] >= 1 and status["rounds"] == 4
    assert status["peers"]["node-01"]["state"] == "alive" and status["metrics"] == {"accuracy": 0.5}
    assert status["sent_bytes"]["heartbeat"] > 0 and status["received_bytes"] > 0
    out = seen["swarm_out"]
    assert seen["code"] == 1  # the ghost did not answer
    assert "ghost" in out and "no answer" in out and "node-01" in out and "1/1 peers alive" in out
    walked = capsys.readouterr().out  # --swarm: the roster node-01 knows, no file
    assert seen["swarm"] == 0 and walked.count("1/1 peers alive") == 2 and "node-00" in walked and "ghost" not in walked
