"""Issue 29 item 2: a node joins through one member (`--join`) and learns where its topology
neighbours are; nobody writes a roster or `[peers]`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from stub_methods import Idle

from p2pmoe.node.config import Timing, node_config_from_experiment
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.swarm import free_ports
from p2pmoe.wire.messages import Message, MessageKind

EXPERIMENT = """
[run]
method = "gossip"
nodes = 5
topology = "ring"
rounds = 2

[timing]
startup = 20
heartbeat = 0.2
round_deadline = 5
linger = 1
"""


def _experiment(tmp_path: Path) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(EXPERIMENT)
    return path


def test_nodes_that_join_through_one_member_find_their_ring_neighbours_and_run(tmp_path: Path):
    experiment = _experiment(tmp_path)
    ids = [f"node-0{k}" for k in range(5)]
    addresses = {node: f"tcp://127.0.0.1:{port}" for node, port in zip(ids, free_ports(5), strict=True)}
    first = addresses["node-00"]
    configs = {
        node: node_config_from_experiment(experiment, None, node, bind=addresses[node], out=tmp_path / node, join=[] if node == "node-00" else [first])
        for node in ids
    }
    daemons = {node: NodeDaemon(cfg, Idle(node)) for node, cfg in configs.items()}

    async def scenario() -> None:
        # the members start one by one, the first one first: nobody knows anybody in advance
        runs = []
        for daemon in daemons.values():
            runs.append(asyncio.create_task(daemon.run()))
            await asyncio.sleep(0.3)
        await asyncio.wait_for(asyncio.gather(*runs), 60)

    asyncio.run(scenario())
    links = configs["node-00"].experiment.links()
    for node, daemon in daemons.items():
        assert sorted(daemon.cfg.peers) == links[node], node  # the ring's neighbours, found at run time
        assert daemon.cfg.peers == {peer: addresses[peer] for peer in links[node]}
        assert daemon.rounds_done == 2 and daemon.failures == [], (node, daemon.failures)
    assert set(daemons["node-00"].roster) == set(ids)  # the first member heard of everyone


def test_a_roster_from_a_peer_is_checked_before_anything_is_learnt(tmp_path: Path):
    (port,) = free_ports(1)
    cfg = node_config_from_experiment(_experiment(tmp_path), None, "node-02", bind=f"tcp://127.0.0.1:{port}", out=tmp_path / "n")
    daemon = NodeDaemon(cfg, Idle("node-02"))
    lies = {
        "stranger": "tcp://10.0.0.9:1",  # not a node of this experiment
        "node-02": "tcp://10.0.0.9:2",  # ourselves
        "node-00": "udp://10.0.0.9:3",  # not an address the protocol writes
        "node-04": "tcp://" + "x" * 300,  # too long
        "node-03": 7,  # not a string
    }
    daemon._learn(lies, "node-00")
    assert daemon.roster == {"node-02": f"tcp://127.0.0.1:{port}"}
    daemon._learn({"node-00": "tcp://10.0.0.1:5"}, "node-04", adopt=False)  # a third party fills a gap ...
    daemon._learn({"node-00": "tcp://10.0.0.1:6"}, "node-04", adopt=False)  # ... but cannot move a node it did not name first
    daemon._learn({"node-04": "tcp://10.0.0.4:5"}, "node-04", adopt=False)  # a node's word about itself counts
    assert daemon.roster["node-00"] == "tcp://10.0.0.1:5" and daemon.roster["node-04"] == "tcp://10.0.0.4:5"
    assert Message(MessageKind.ROSTER, 0).kind.value == "roster"


def test_join_options_are_checked_with_the_remedy(tmp_path: Path):
    experiment = _experiment(tmp_path)
    with pytest.raises(ValueError, match="give --bind"):
        node_config_from_experiment(experiment, None, "node-01")
    with pytest.raises(ValueError, match="give --advertise"):
        node_config_from_experiment(experiment, None, "node-01", bind="tcp://0.0.0.0:5550", join=["tcp://10.0.0.1:5550"])
    with pytest.raises(ValueError, match="ID=tcp://host:port"):
        node_config_from_experiment(experiment, None, "node-01", bind="tcp://127.0.0.1:5550", join=["10.0.0.1:5550"])
    with pytest.raises(ValueError, match="not a node of"):
        node_config_from_experiment(experiment, None, "node-9", bind="tcp://127.0.0.1:5550")
    cfg = node_config_from_experiment(
        experiment, None, "node-01", bind="tcp://0.0.0.0:5550", advertise="tcp://10.0.0.2:5550", join=["node-00=tcp://10.0.0.1:5550"]
    )
    assert cfg.discover == {"node-00", "node-02"} and cfg.peers == {} and cfg.advertise == "tcp://10.0.0.2:5550"
    assert Timing().startup > 0


def test_an_mdns_announcement_counts_only_for_the_same_experiment(tmp_path: Path):
    from p2pmoe.node.mdns import host_and_port

    (port,) = free_ports(1)
    cfg = node_config_from_experiment(_experiment(tmp_path), None, "node-02", bind=f"tcp://127.0.0.1:{port}", out=tmp_path / "n", mdns=True)
    daemon = NodeDaemon(cfg, Idle("node-02"))
    daemon._heard_by_mdns("node-01", "tcp://10.0.0.1:5550", "0" * 64)  # another experiment on the same LAN
    assert "node-01" not in daemon.roster
    assert host_and_port("tcp://192.0.2.10:5550") == ("192.0.2.10", 5550)
    with pytest.raises(ValueError, match="literal IPv4"):
        node_config_from_experiment(_experiment(tmp_path), None, "node-02", bind="tcp://myhost:5550", out=tmp_path / "n", mdns=True)
    with pytest.raises(ValueError, match="either --roster FILE or --mdns"):
        roster = tmp_path / "roster.toml"
        roster.write_text("[nodes]\n" + "\n".join(f'node-0{k} = "tcp://127.0.0.1:{5000 + k}"' for k in range(5)) + "\n")
        node_config_from_experiment(_experiment(tmp_path), roster, "node-02", mdns=True)


def test_with_curve_keys_nodes_join_by_id_and_a_stranger_cannot_add_itself(tmp_path: Path):
    """Issue 29: under CURVE the keys folder is the allow-list. Nodes join by naming the member
    (ID=ADDRESS) and find their neighbours; a process with a key of its own, not in the
    folder, asking for the roster in a member's name gets no answer and is in nobody's roster."""
    from p2pmoe.cli import main
    from p2pmoe.node.security import CurveSettings, read_public_key
    from p2pmoe.node.status import ask

    experiment = _experiment(tmp_path)
    ids = [f"node-0{k}" for k in range(5)]
    assert main(["keys", "--out", str(tmp_path / "keys"), *ids]) == 0
    assert main(["keys", "--out", str(tmp_path / "stranger"), "node-03"]) == 0  # a valid key pair, for a name of the run, never listed
    addresses = {node: f"tcp://127.0.0.1:{port}" for node, port in zip(ids, free_ports(5), strict=True)}
    join = [f"node-00={addresses['node-00']}"]
    configs = {
        node: node_config_from_experiment(
            experiment, None, node, bind=addresses[node], out=tmp_path / node, keys=tmp_path / "keys", join=[] if node == "node-00" else join
        )
        for node in ids
    }
    daemons = {node: NodeDaemon(cfg, Idle(node)) for node, cfg in configs.items()}
    stranger = CurveSettings(tmp_path / "stranger" / "node-03.key_secret", tmp_path / "stranger" / "node-03.key", {})
    public, secret = stranger.keypair()
    outcome: dict = {}

    async def scenario() -> None:
        runs = [asyncio.create_task(d.run()) for d in daemons.values()]
        await asyncio.sleep(0.5)
        request = Message(MessageKind.ROSTER, 0, meta={"req": 1, "config": daemons["node-00"].config_hash, "roster": {"node-03": "tcp://10.9.9.9:1"}})
        try:
            await asyncio.to_thread(ask, addresses["node-00"], request, "node-03", 1.0, (public, secret, read_public_key(tmp_path / "keys" / "node-00.key")))
            outcome["answered"] = True
        except ValueError:
            outcome["answered"] = False
        await asyncio.wait_for(asyncio.gather(*runs), 60)

    asyncio.run(scenario())
    assert outcome == {"answered": False}
    links = configs["node-00"].experiment.links()
    for node, daemon in daemons.items():
        assert sorted(daemon.cfg.peers) == links[node] and daemon.failures == [], node
    assert daemons["node-00"].roster["node-03"] == addresses["node-03"]  # the stranger's address never got in


def test_peer_given_addresses_are_checked_and_a_neighbour_never_found_is_a_failure(tmp_path: Path):
    from p2pmoe.node.daemon import dialable

    assert dialable("tcp://10.0.0.1:5550") and dialable("tcp://host.lan:1")
    for bad in ("tcp://abc", "tcp://:5", "tcp://h:0", "tcp://h:99999", "ipc:///tmp/x", "tcp://a b:5", 7, "tcp://" + "x" * 300 + ":1"):
        assert not dialable(bad), bad
    (port,) = free_ports(1)
    cfg = node_config_from_experiment(_experiment(tmp_path), None, "node-02", bind=f"tcp://127.0.0.1:{port}", out=tmp_path / "n")
    daemon = NodeDaemon(cfg, Idle("node-02"))
    daemon._learn({"node-01": "tcp://abc", "node-03": "ipc:///etc/passwd"}, "node-01")
    assert set(daemon.roster) == {"node-02"}
    daemon._heard_by_mdns("node-04", "tcp://10.0.0.4:1", daemon.config_hash)  # mDNS fills a gap ...
    daemon._learn({"node-04": "tcp://10.0.0.5:1"}, "node-04", adopt=False)  # ... that the node's own word may correct
    daemon._heard_by_mdns("node-04", "tcp://10.6.6.6:1", daemon.config_hash)  # but an announcement never overrides
    assert daemon.roster["node-04"] == "tcp://10.0.0.5:1"
    assert daemon._failures()[0].startswith("never learnt where topology neighbour(s) node-01, node-03 are")
