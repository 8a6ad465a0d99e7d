"""Nodes in separate network namespaces, joined by veth pairs on a bridge, so traffic really
crosses interfaces. Cutting one node's link makes it drop out; the rest finish the run.

Needs root and iproute2; skipped with the reason otherwise. Addresses are from TEST-NET-1
(192.0.2.0/24), which exists only inside the namespaces this test makes and removes.
"""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from p2pmoe.config import default_config
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.experiment import resolve_experiment
from p2pmoe.node.config import Timing
from p2pmoe.node.swarm import start_node, write_node_configs


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"p2pm-probe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "ip netns add is not permitted here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not Path(FMNIST_ROOT).is_dir():
        return "Fashion-MNIST not installed (make data)"
    return None


SKIP = _can_make_namespaces()
pytestmark = [pytest.mark.skipif(SKIP is not None, reason=SKIP or ""), pytest.mark.slow]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Namespaces:
    """A bridge namespace and one namespace per node, each with one veth into the bridge."""

    def __init__(self, nodes: list[str]) -> None:
        tag = os.getpid() % 10000
        self.bridge = f"p2pm{tag}-br"
        self.ns = {node: f"p2pm{tag}-{i}" for i, node in enumerate(nodes)}
        self.bridge_side = {node: f"p2pb{tag}x{i}" for i, node in enumerate(nodes)}
        self.address = {node: f"192.0.2.{10 + i}" for i, node in enumerate(nodes)}

    def __enter__(self) -> "Namespaces":
        _ip("netns", "add", self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for node, ns in self.ns.items():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", self.bridge_side[node], "netns", self.bridge)
            _ip("-n", ns, "addr", "add", f"{self.address[node]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.bridge, "link", "set", self.bridge_side[node], "master", "br0")
            _ip("-n", self.bridge, "link", "set", self.bridge_side[node], "up")
        return self

    def cut(self, node: str) -> None:
        _ip("-n", self.bridge, "link", "set", self.bridge_side[node], "down")

    def __exit__(self, *exc: object) -> None:
        for ns in [*self.ns.values(), self.bridge]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.timeout(300)
def test_cut_link_drops_a_node_and_the_rest_finish(tmp_path):
    cfg = default_config(method="fedavg", data="fmnist", nodes=3, rounds=4, max_train_per_node=300, seed=1, out=str(tmp_path))
    ids = resolve_experiment(cfg).node_ids
    timing = Timing(round_deadline=15, heartbeat=0.5, suspect_after=1.5, dead_after=3, startup=30, linger=3)
    with Namespaces(ids) as net:
        addresses = {node: f"tcp://{net.address[node]}:5550" for node in ids}
        configs = write_node_configs(resolve_experiment(cfg), tmp_path, timing, addresses, insecure=True)  # plaintext inside the test's namespaces
        procs = {n: start_node(configs[n], configs[n].parent / "node.log", ["ip", "netns", "exec", net.ns[n]]) for n in ids}
        try:
            victim = tmp_path / "nodes" / "node-02"
            deadline = time.monotonic() + 120
            while not _rows(victim / "metrics.jsonl") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _rows(victim / "metrics.jsonl"), (victim / "node.log").read_text()[-2000:]
            net.cut("node-02")
            for node in ("node-00", "node-01", "server"):
                assert procs[node].wait(timeout=180) == 0, (tmp_path / "nodes" / node / "node.log").read_text()[-2000:]
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
    for node in ("node-00", "node-01", "server"):
        assert [r["round"] for r in _rows(tmp_path / "nodes" / node / "metrics.jsonl")] == list(range(cfg.run.rounds))
    assert "peer node-02 is gone" in (tmp_path / "nodes" / "server" / "node.log").read_text()


RECEIVE = """
import asyncio, hashlib, sys, time
from p2pmoe.node.transport import Transport
async def main():
    async with Transport("b", sys.argv[1]) as node:
        print("ready", flush=True)
        start = time.monotonic()
        envelope = await asyncio.wait_for(node.recv(), 120)
        data = envelope.message.tensors["w"].numpy().tobytes()
        print("got", hashlib.sha256(data).hexdigest(), round(time.monotonic() - start, 1), flush=True)
asyncio.run(main())
"""
SEND = """
import asyncio, sys, torch
from p2pmoe.node.transport import Transport
from p2pmoe.wire.messages import Message, MessageKind
async def main():
    async with Transport("a", "tcp://127.0.0.1:0") as node:
        node.add_peer("b", sys.argv[1])
        await node.send("b", Message(MessageKind.EMBEDDING, 0, {"w": torch.arange(2**19, dtype=torch.float32)}))
        await asyncio.sleep(60)  # keep the connection while the bytes drain through the slow link
asyncio.run(main())
"""


@pytest.mark.timeout(150)
def test_a_2mib_tensor_crosses_a_1_mbit_link():
    """Issue 26 N8: a 2 MiB frame needs ~17 s at 1 Mbit/s; ZMTP heartbeats reset only when a
    whole frame has arrived, so the 5 s heartbeat timeout cut the connection and the tensor
    was lost. Tensors now travel in frames of 256 KiB (~2 s each at that rate)."""
    with Namespaces(["a", "b"]) as net:
        _ip("-n", net.ns["a"], "link", "set", "eth0", "mtu", "1500")
        subprocess.run(
            ["ip", "netns", "exec", net.ns["a"], "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "1mbit", "burst", "4kb", "latency", "500ms"],
            check=True,
        )
        address = f"tcp://{net.address['b']}:5550"
        python = ["ip", "netns", "exec"]
        receiver = subprocess.Popen([*python, net.ns["b"], sys.executable, "-c", RECEIVE, "tcp://*:5550"], stdout=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
            sender = subprocess.Popen([*python, net.ns["a"], sys.executable, "-c", SEND, address])
            try:
                line = receiver.stdout.readline().split()
                assert receiver.wait(timeout=120) == 0
            finally:
                sender.kill()
                sender.wait(timeout=10)
        finally:
            if receiver.poll() is None:
                receiver.kill()
    expected = hashlib.sha256(torch.arange(2**19, dtype=torch.float32).numpy().tobytes()).hexdigest()
    assert line[:2] == ["got", expected]
    assert float(line[2]) > 10  # the link really was that slow: 2 MiB at 1 Mbit/s is ~17 s


JOIN_EXPERIMENT = """
[run]
method = "fedmoe-da"
data = "fmnist"
nodes = 6
topology = "ring"
rounds = 3
max_train_per_node = 200
seed = 2

[task]
global_test_size = 100

[timing]
startup = 60
heartbeat = 0.5
round_deadline = 30
linger = 3
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["join", "mdns"])
def test_six_nodes_in_namespaces_find_their_ring_neighbours_and_run_fedmoe_da(tmp_path, how):
    """Issue 29: one experiment file copied to every machine and one command per machine; a
    node knows only one member's address (`--join`), or nobody's (`--mdns`: multicast DNS
    across the bridge), and each finds exactly its ring neighbours."""
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(JOIN_EXPERIMENT)
    ids = [f"node-0{k}" for k in range(6)]
    with Namespaces(ids) as net:
        first = f"tcp://{net.address['node-00']}:5550"
        procs = {}
        for node in ids:
            folder = tmp_path / node
            folder.mkdir()
            command = ["ip", "netns", "exec", net.ns[node], sys.executable, "-m", "p2pmoe.cli", "node", "--experiment", str(experiment)]
            command += ["--id", node, "--bind", f"tcp://{net.address[node]}:5550", "--out", str(folder), "--threads", "1", "--insecure"]
            if how == "mdns":
                command += ["--mdns"]
            elif node != "node-00":
                command += ["--join", first]
            with open(folder / "node.log", "ab") as log:
                procs[node] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for node, proc in procs.items():
                assert proc.wait(timeout=240) == 0, (tmp_path / node / "node.log").read_text()[-3000:]
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
    ring = {node: sorted({ids[(k - 1) % 6], ids[(k + 1) % 6]}) for k, node in enumerate(ids)}
    for node in ids:
        log = (tmp_path / node / "node.log").read_text()
        found = sorted(line.split(" found ")[1].split(" at ")[0] for line in log.splitlines() if f"{node}: found " in line)
        assert found == ring[node], (node, found)
        assert [r["round"] for r in _rows(tmp_path / node / "metrics.jsonl")] == [0, 1, 2]
        kinds = {row["kind"] for row in csv.DictReader((tmp_path / node / "ledger.csv").open())}
        assert {"gate_publish", "expert_request", "expert_response"} <= kinds  # experts really travelled between the found peers
