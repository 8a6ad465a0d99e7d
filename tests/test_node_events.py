"""Daemons on loopback, in one process: calls into a method never overlap, a refused request
reaches the method at once, peers running another experiment are refused, swarm threads."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from raw_wire import replies_once_refused

from p2pmoe.config import default_config
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.methods.base import Method
from p2pmoe.node.config import NodeConfig, Timing, load_node_config
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.swarm import free_ports, write_node_configs
from p2pmoe.wire.codec import ProtocolError, encode
from p2pmoe.wire.messages import Message, MessageKind, Send

FAST = Timing(round_deadline=60, heartbeat=0.2, suspect_after=1, dead_after=3, startup=10, linger=1, request_timeout=20, request_retries=0)


class SlowTrainer(Method):
    """Trains round 1 for a while and records whether a message ever arrived mid-training."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.training = False
        self.training_started = threading.Event()
        self.release = threading.Event()
        self.messages: list[tuple[int, bool]] = []

    def train_local(self, round_index: int) -> dict[str, float]:
        self.training = True
        if round_index == 1:
            self.training_started.set()
            self.release.wait(20)
        self.training = False
        return {}

    def start_round(self, round_index: int) -> list[Send]:
        return []

    def on_message(self, src: str, message: Message) -> list[Send]:
        self.messages.append((message.round, self.training))
        return []

    def round_complete(self) -> bool:
        return True


def _node(tmp_path: Path, name: str, peers: dict[str, str], address: str, cfg=None, timing: Timing = FAST) -> NodeConfig:
    cfg = cfg or default_config(method="local", rounds=2)
    return NodeConfig(name, address, tmp_path / name, peers, resolve_experiment(cfg), timing)


@pytest.mark.timeout(60)
def test_a_message_that_arrives_while_the_method_trains_waits_for_training_to_end(tmp_path):
    port, silent = free_ports(2)  # the late peer is configured (only configured peers' messages wait), and never says hello
    method = SlowTrainer("node-00")
    timing = dataclasses.replace(FAST, startup=1)  # the late peer never comes: no need to wait long for it
    daemon = NodeDaemon(_node(tmp_path, "node-00", {"late-peer": f"tcp://127.0.0.1:{silent}"}, f"tcp://127.0.0.1:{port}", timing=timing), method=method)

    async def scenario() -> None:
        run = asyncio.create_task(daemon.run())
        await asyncio.to_thread(method.training_started.wait, 30)
        context = zmq.asyncio.Context()
        peer = context.socket(zmq.DEALER)
        peer.setsockopt(zmq.ROUTING_ID, b"late-peer")
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(f"tcp://127.0.0.1:{port}")
        # A late message of round 0 (a delayed reply, say) while round 1 trains.
        await peer.send_multipart([bytes(f) for f in encode("late-peer", Message(MessageKind.GOSSIP, 0, meta={"degree": 1}))])
        await asyncio.sleep(1.0)  # the node's receive loop has it well before training ends
        method.release.set()
        await asyncio.wait_for(run, 30)
        peer.close()
        context.term()

    asyncio.run(scenario())
    assert method.messages == [(0, False)]  # handed over, but only after training returned


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_a_refused_expert_request_replans_the_round_at_once(tmp_path, caplog):
    cfg = default_config(method="fedmoe-da", nodes=2, rounds=1, max_train_per_node=64, seed=2)
    nodes = build_experiment(resolve_experiment(cfg)).nodes
    refusing = nodes["node-01"]

    def refuse(src, message):
        raise ProtocolError("experts are not for you")

    refusing._on_expert_request = refuse  # type: ignore[method-assign]
    a, b = free_ports(2)
    addresses = {"node-00": f"tcp://127.0.0.1:{a}", "node-01": f"tcp://127.0.0.1:{b}"}
    daemons = {n: NodeDaemon(_node(tmp_path, n, {p: addr for p, addr in addresses.items() if p != n}, addresses[n], cfg), method=nodes[n]) for n in addresses}
    requester = daemons["node-00"]
    times: dict[str, float] = {}
    start, wait = requester.runner.start, requester.wait

    def timed_start(r):
        times["start"] = time.monotonic()
        return start(r)

    async def timed_wait(node, timeout):
        finished = await wait(node, timeout)
        times["complete" if finished else "deadline"] = time.monotonic()
        return finished

    requester.runner.start = timed_start  # type: ignore[method-assign]
    requester.wait = timed_wait  # type: ignore[method-assign]

    async def scenario() -> None:
        await asyncio.gather(*(d.run() for d in daemons.values()))

    with caplog.at_level(logging.WARNING, logger="p2pmoe.driver"):
        asyncio.run(scenario())
    assert "expert_request to node-01 failed (refused): experts are not for you" in caplog.text
    assert "deadline" not in times and times["complete"] - times["start"] < FAST.round_deadline / 10  # no idling to the deadline


class Idle(Method):
    def start_round(self, round_index: int) -> list[Send]:
        return []

    def on_message(self, src: str, message: Message) -> list[Send]:
        return []

    def round_complete(self) -> bool:
        return True


@pytest.mark.timeout(60)
def test_a_peer_running_another_experiment_is_refused_with_the_keys_that_differ(tmp_path, caplog):
    a, b = free_ports(2)
    addresses = {"node-00": f"tcp://127.0.0.1:{a}", "node-01": f"tcp://127.0.0.1:{b}"}
    seeds = {"node-00": 0, "node-01": 1}
    daemons = {
        n: NodeDaemon(
            _node(tmp_path, n, {p: x for p, x in addresses.items() if p != n}, addresses[n], default_config(method="local", rounds=1, seed=seeds[n])),
            method=Idle(n),
        )
        for n in addresses
    }
    for d in daemons.values():
        d.cfg = NodeConfig(d.cfg.node_id, d.cfg.bind, d.cfg.out, d.cfg.peers, d.cfg.experiment, Timing(startup=1.5, heartbeat=0.2, linger=0.5))

    async def scenario() -> None:
        await asyncio.gather(*(d.run() for d in daemons.values()))

    with caplog.at_level(logging.ERROR, logger="p2pmoe.node"):
        asyncio.run(scenario())
    assert daemons["node-00"].refused_peers == {"node-01": ["run.seed: 0 here, 1 there"]}
    assert daemons["node-01"].refused_peers == {"node-00": ["run.seed: 1 here, 0 there"]}
    assert "node-00: refusing node-01: it runs another experiment; keys that differ: run.seed: 0 here, 1 there" in caplog.text
    assert daemons["node-00"].peer_rounds == {}  # its round was never taken


def test_swarm_processes_share_the_cores_out(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cfg = default_config(method="fedavg", nodes=4, rounds=1)  # 4 clients and a server: 5 processes
    paths = write_node_configs(resolve_experiment(cfg), tmp_path, Timing())
    assert {load_node_config(p).experiment.run.threads for p in paths.values()} == {3}
    pinned = write_node_configs(resolve_experiment(default_config(method="fedavg", nodes=4, rounds=1, threads=2)), tmp_path / "pinned", Timing())
    assert {load_node_config(p).experiment.run.threads for p in pinned.values()} == {2}


@pytest.mark.timeout(60)
def test_a_flood_of_bad_messages_is_logged_in_a_few_lines(caplog):
    from p2pmoe.node.transport import Transport

    async def scenario() -> None:
        async with Transport("node-00", "tcp://127.0.0.1:*") as node:
            context = zmq.asyncio.Context()
            peer = context.socket(zmq.DEALER)
            peer.setsockopt(zmq.ROUTING_ID, b"flooder")
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(node.address)
            for _ in range(200):
                await peer.send_multipart([b"\xff" * 16])
            replies = await replies_once_refused(node, peer, 200)
            assert node.refused == 200 and replies + node.unanswered == 200  # every one refused; a few answered a second
            assert 1 <= replies <= 40
            peer.close()
            context.term()

    with caplog.at_level(logging.WARNING, logger="p2pmoe.transport"):
        asyncio.run(scenario())
    assert 1 <= sum("refused a message" in r.getMessage() for r in caplog.records) <= 6


def test_only_configured_peers_messages_are_held(tmp_path):
    """Issue 26 N3: a stranger's messages for a later round get an error and use none of the
    holding budget; a configured peer's are held as before."""
    from p2pmoe.wire.codec import Envelope

    class Capture:
        def __init__(self):
            self.sent = []

        async def send(self, dst, message, timeout=None):
            self.sent.append((dst, message))

    daemon = NodeDaemon(_node(tmp_path, "node-00", {"node-01": "tcp://127.0.0.1:1"}, "tcp://127.0.0.1:2"), method=Idle("node-00"))
    daemon.transport = Capture()  # type: ignore[assignment]
    daemon.runner.start(0)
    ahead = Message(MessageKind.GOSSIP, 1, meta={})

    async def scenario():
        for k in range(50):
            await daemon._dispatch(Envelope(f"stranger-{k}", ahead))
        await daemon._dispatch(Envelope("node-01", ahead))

    asyncio.run(scenario())
    assert len(daemon.transport.sent) == 50 and all(m.kind == MessageKind.ERROR and dst.startswith("stranger") for dst, m in daemon.transport.sent)
    assert daemon.runner.holds_messages  # the configured peer's early message waits for round 1


def test_one_peers_word_never_moves_a_node_ahead_but_a_quorum_or_the_coordinator_does():
    """Issue 26 N5: a single peer claiming a late round is not believed."""
    from p2pmoe.naming import SERVER_ID
    from p2pmoe.node.daemon import agreed_round

    assert agreed_round({"node-01": 48}, configured=1) == -1
    assert agreed_round({"node-01": 48, "node-02": 3, "node-03": 3}, configured=3) == 3
    assert agreed_round({"node-01": 48, "node-02": 7, "node-03": 5}, configured=3) == 7  # two of three are at 7 or later
    assert agreed_round({"node-01": 9}, configured=4) == -1
    assert agreed_round({SERVER_ID: 12}, configured=1) == 12
