"""Issue 29 item 1: every machine has the same experiment file and roster; a node's peers come
from the experiment's topology, their addresses from the roster, and nothing else is written
by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pmoe.cli import main
from p2pmoe.config import default_config
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.experiment import resolve_experiment
from p2pmoe.node.config import node_config_from_experiment
from p2pmoe.node.swarm import free_ports

EXPERIMENT = """
[run]
method = "fedmoe-da"
data = "fmnist"
nodes = 4
rounds = 2
topology = "ring"
max_train_per_node = 100
threads = 1

[task]
global_test_size = 100

[timing]
round_deadline = 60.0
heartbeat = 0.5
startup = 60.0
linger = 2.0
"""


def _files(folder: Path, ids: list[str], ports: list[int]) -> tuple[Path, Path]:
    experiment, roster = folder / "experiment.toml", folder / "roster.toml"
    experiment.write_text(EXPERIMENT)
    roster.write_text("[nodes]\n" + "".join(f'"{n}" = "tcp://127.0.0.1:{p}"\n' for n, p in zip(ids, ports, strict=True)))
    return experiment, roster


def test_peers_are_the_topology_neighbours_with_roster_addresses(tmp_path):
    ids = [f"node-0{k}" for k in range(4)]
    experiment, roster = _files(tmp_path, ids, [5001, 5002, 5003, 5004])
    ring = resolve_experiment(default_config(method="fedmoe-da", nodes=4, topology="ring")).graph
    for k, node in enumerate(ids):
        cfg = node_config_from_experiment(experiment, roster, node, local={"data_root": "/somewhere"})
        assert set(cfg.peers) == set(ring.neighbors(node)) and cfg.bind == f"tcp://127.0.0.1:{5001 + k}"
        assert all(address == f"tcp://127.0.0.1:{5001 + ids.index(peer)}" for peer, address in cfg.peers.items())
        assert cfg.experiment.run.data_root == "/somewhere" and cfg.out == Path("runs") / node and cfg.timing.heartbeat == 0.5


def test_a_roster_that_disagrees_with_the_experiment_names_what_differs(tmp_path):
    experiment, roster = _files(tmp_path, ["node-00", "node-01", "node-02", "nodd-03"], [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"missing from the roster: \['node-03'\], not in the experiment: \['nodd-03'\]"):
        node_config_from_experiment(experiment, roster, "node-00")
    experiment, roster = _files(tmp_path, [f"node-0{k}" for k in range(4)], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="--id 'node-9' is not in"):
        node_config_from_experiment(experiment, roster, "node-9")
    with pytest.raises(ValueError, match="'seed' is not a node-local"):
        node_config_from_experiment(experiment, roster, "node-00", local={"seed": 3})
    with pytest.raises(ValueError, match=r"no key file node-00\.key_secret"):
        node_config_from_experiment(experiment, roster, "node-00", keys=tmp_path / "keys")
    assert main(["node", "--config", str(experiment), "--id", "node-00"]) == 2  # a node file says it all itself


def test_keys_folder_turns_curve_on_for_exactly_the_peers(tmp_path):
    ids = [f"node-0{k}" for k in range(4)]
    experiment, roster = _files(tmp_path, ids, [1, 2, 3, 4])
    assert main(["keys", "--out", str(tmp_path / "keys"), *ids]) == 0
    cfg = node_config_from_experiment(experiment, roster, "node-00", keys=tmp_path / "keys")
    assert cfg.curve is not None and set(cfg.curve.allowed_public_keys) == {"node-01", "node-03"}


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
@pytest.mark.timeout(240)
def test_four_daemons_from_one_experiment_file_and_roster_finish_the_run(tmp_path):
    ids = [f"node-0{k}" for k in range(4)]
    experiment, roster = _files(tmp_path, ids, free_ports(4))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "p2pmoe.cli", "node", "--experiment", str(experiment), "--roster", str(roster), "--id", n, "--out", str(tmp_path / n)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"{n}.log", "w"),  # noqa: SIM115 - closed with the process
        )
        for n in ids
    ]
    try:
        codes = [p.wait(timeout=200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0, 0, 0], (tmp_path / "node-00.log").read_text()[-2000:]
    ring = resolve_experiment(default_config(method="fedmoe-da", nodes=4, topology="ring")).graph
    for n in ids:
        rows = [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1]
        talked = {row[2] for row in (line.split(",") for line in (tmp_path / n / "ledger.csv").read_text().splitlines()[1:])}
        assert talked == set(ring.neighbors(n))  # every message went to a topology neighbour


def test_the_shared_lan_example_gives_every_node_its_ring_neighbours():
    folder = Path(__file__).parent.parent / "peers" / "shared"
    for k in range(6):
        cfg = node_config_from_experiment(folder / "experiment.toml", folder / "roster.toml", f"node-0{k}", insecure=True)
        assert sorted(cfg.peers) == sorted({f"node-0{(k - 1) % 6}", f"node-0{(k + 1) % 6}"}) and cfg.timing.round_deadline == 300.0


def test_an_experiment_file_may_not_say_where_a_machine_writes_or_listen_anywhere(tmp_path):
    experiment, roster = _files(tmp_path, [f"node-0{k}" for k in range(4)], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="--bind must be an address"):
        node_config_from_experiment(experiment, roster, "node-00", bind="0.0.0.0:5550")
    experiment.write_text(EXPERIMENT.replace("threads = 1\n", 'threads = 1\nout = "runs/x"\n'))
    with pytest.raises(ValueError, match=r"\[run\] out is each machine's own"):
        node_config_from_experiment(experiment, roster, "node-00")
