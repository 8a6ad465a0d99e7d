"""Hostile input against a live node daemon running FedMoE-DA: every bad message gets an ERROR
reply or is dropped, the node keeps serving, and its model does not change."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.methods.fedmoe_da import FedMoEDANode
from p2pmoe.models import MoEClassifier
from p2pmoe.models.params import float_state
from p2pmoe.node.config import NodeConfig
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.transport import Transport
from p2pmoe.wire.codec import decode, encode
from p2pmoe.wire.messages import Message, MessageKind

NODE, ATTACKER = "node-00", "mallory"
REPLY_TIMEOUT = 5.0


def _node() -> FedMoEDANode:
    torch.manual_seed(0)
    model = MoEClassifier(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), 8, 3, 8, 2)
    x = torch.randn(32, 4)
    learner = ImageClassifierLearner(model, (x, (x[:, 0] > 0).long()), (x[:8], (x[:8, 0] > 0).long()))
    # The attacker is a peer the method listens to, so the method's own checks are exercised.
    return FedMoEDANode(NODE, learner, visible=[ATTACKER], neighbours=[], p=1, embedding="frozen")


def _bad_messages() -> list[tuple[str, Message]]:
    gate = torch.zeros(3, 8)
    return [
        ("gate of the wrong shape", Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.zeros(2, 8)})),
        ("gate of the wrong dtype", Message(MessageKind.GATE_PUBLISH, 0, {"gate": gate.double()})),
        ("gate with extra tensors", Message(MessageKind.GATE_PUBLISH, 0, {"gate": gate, "x": gate})),
        ("slots out of range", Message(MessageKind.EXPERT_REQUEST, 0, meta={"req": 1, "slots": [99]})),
        ("no slots", Message(MessageKind.EXPERT_REQUEST, 0, meta={"req": 2, "slots": []})),
        ("repeated slots", Message(MessageKind.EXPERT_REQUEST, 0, meta={"req": 3, "slots": [0, 0]})),
        ("slots not ints", Message(MessageKind.EXPERT_REQUEST, 0, meta={"req": 4, "slots": ["0"]})),
        ("unsolicited experts", Message(MessageKind.EXPERT_RESPONSE, 0, {"expert.0.linears.0.weight": torch.zeros(8, 8)})),
        ("embedding from a non-neighbour", Message(MessageKind.EMBEDDING, 0, {"embedder.0.weight": torch.zeros(8, 4)}, {"degree": 1})),
        ("a global model nobody asked for", Message(MessageKind.MODEL_GLOBAL, 0, {})),
        ("a plan from a non-server", Message(MessageKind.AGGREGATION_PLAN, 0, {"weights": torch.ones(3, 3)}, {"sources": []})),
    ]


def _raw_garbage() -> list[list[bytes]]:
    header = msgpack.unpackb(encode(ATTACKER, Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.zeros(3, 8)}))[0])
    nan = encode(ATTACKER, Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.full((3, 8), float("nan"))}))
    lying = dict(header, tensors=[["gate", "float32", [3, 8], 10**12, 1]])
    return [
        [bytes(f) for f in nan],
        [msgpack.packb(lying), b"\x00" * 96],
        [msgpack.packb(dict(header, kind="exfiltrate")), b"\x00" * 96],
        [msgpack.packb(dict(header, src=NODE)), b"\x00" * 96],  # spoofing the node itself
        [b"\xff" * 40],
    ]


class Harness:
    """A daemon's receive loop on loopback and an attacker's raw DEALER."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path

    async def __aenter__(self) -> Harness:
        # the attacker is a configured peer (its messages may be held), whose numbers lie
        cfg = NodeConfig(
            NODE, "tcp://127.0.0.1:0", self.tmp_path / "node", {ATTACKER: "tcp://127.0.0.1:9"}, resolve_experiment(default_config(method="fedmoe-da"))
        )
        self.method = _node()
        self.daemon = NodeDaemon(cfg, method=self.method)
        self.daemon.transport = Transport(NODE, "tcp://127.0.0.1:*")
        self.method.start_round(0)
        self.daemon.runner.round = 0
        self.serving = asyncio.create_task(self.daemon._receive_loop())
        self.context = zmq.asyncio.Context()
        self.client = self.context.socket(zmq.DEALER)
        self.client.setsockopt(zmq.ROUTING_ID, ATTACKER.encode())
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(self.daemon.transport.address)
        return self

    async def send(self, frames: list[bytes]) -> None:
        await self.client.send_multipart(frames)

    async def reply(self) -> Message | None:
        if not await self.client.poll(REPLY_TIMEOUT * 1000):
            return None
        return decode(await self.client.recv_multipart()).message

    async def __aexit__(self, *exc: object) -> None:
        self.serving.cancel()
        await asyncio.gather(self.serving, return_exceptions=True)
        self.client.close()
        self.context.term()
        await self.daemon.transport.close()


@pytest.mark.timeout(60)
def test_bad_messages_get_errors_and_change_nothing(tmp_path):
    async def scenario() -> None:
        async with Harness(tmp_path) as h:
            before = float_state(h.method.learner.model)
            bad = _bad_messages()
            gates = [(what, m) for what, m in bad if m.kind is MessageKind.GATE_PUBLISH]
            # A bad gate ends the wait for its sender (issue 26): the node plans without it, so
            # the bad gates go last, once the valid one below has been taken.
            for what, message in [(what, m) for what, m in bad if m.kind is not MessageKind.GATE_PUBLISH]:
                await h.send([bytes(f) for f in encode(ATTACKER, message)])
                answer = await h.reply()
                assert answer is not None and answer.kind == MessageKind.ERROR, what
            for frames in _raw_garbage():
                await h.send(frames)
                answer = await h.reply()
                assert answer is None or answer.kind == MessageKind.ERROR
            after = float_state(h.method.learner.model)
            assert all(torch.equal(before[k], after[k]) for k in before)
            # Still serving, and still doing its job: a valid gate makes it plan and fetch.
            gate = h.method.moe.gating_matrix()
            await h.send([bytes(f) for f in encode(ATTACKER, Message(MessageKind.GATE_PUBLISH, 0, {"gate": gate}))])
            answer = await h.reply()
            assert answer is not None and answer.kind == MessageKind.EXPERT_REQUEST
            assert answer.meta["slots"] == [0, 1, 2]  # identical proxies: every slot picks its twin
            for what, message in gates:
                await h.send([bytes(f) for f in encode(ATTACKER, message)])
                answer = await h.reply()
                assert answer is not None and answer.kind == MessageKind.ERROR, what

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_random_frames_never_change_the_model(tmp_path):
    async def scenario() -> None:
        async with Harness(tmp_path) as h:
            before = float_state(h.method.learner.model)

            pending: list[list[bytes]] = []

            # Hypothesis draws the cases; they are sent afterwards, from inside the event loop.
            @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
            @given(st.lists(st.binary(max_size=256), min_size=1, max_size=4))
            def draw(frames: list[bytes]) -> None:
                pending.append(frames)

            draw()
            for frames in pending:
                await h.send(frames)
            hello = encode(ATTACKER, Message(MessageKind.HELLO, 0, meta={"req": 7}))
            await h.send([bytes(f) for f in hello])
            replies = []
            while (answer := await h.reply()) is not None and answer.kind != MessageKind.HELLO:
                replies.append(answer.kind)
            assert answer is not None and answer.meta.get("req") == 7
            assert set(replies) <= {MessageKind.ERROR}
            after = float_state(h.method.learner.model)
            assert all(torch.equal(before[k], after[k]) for k in before)

    asyncio.run(scenario())


def _expert_reply(method: FedMoEDANode, req: object, slots: list[int]) -> Message:
    from p2pmoe.methods.fedmoe_da import expert_tensors

    meta = {} if req is None else {"req": req}
    return Message(MessageKind.EXPERT_RESPONSE, 0, expert_tensors({s: method.moe.expert_state(s) for s in slots}), meta)


@pytest.mark.timeout(60)
def test_expert_replies_must_answer_the_outstanding_request_exactly(tmp_path):
    """A reply with another request id (or none) is refused and the genuine one still counts;
    a reply to the request with other slots than asked ends the wait instead of idling."""

    async def scenario() -> None:
        async with Harness(tmp_path) as h:
            gate = h.method.moe.gating_matrix().detach()
            await h.send([bytes(f) for f in encode(ATTACKER, Message(MessageKind.GATE_PUBLISH, 0, {"gate": gate}))])
            request = await h.reply()
            assert request is not None and request.kind == MessageKind.EXPERT_REQUEST
            req, slots = request.meta["req"], request.meta["slots"]
            for wrong in (req + 1, None, True):
                await h.send([bytes(f) for f in encode(ATTACKER, _expert_reply(h.method, wrong, slots))])
                answer = await h.reply()
                assert answer is not None and answer.kind == MessageKind.ERROR and "req" in answer.meta["reason"]
            assert not h.method.round_complete()  # still waiting for the genuine reply
            await h.send([bytes(f) for f in encode(ATTACKER, _expert_reply(h.method, req, slots))])
            await asyncio.sleep(0.3)
            assert h.method.round_complete()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_reply_with_the_wrong_slots_ends_the_wait_for_that_peer(tmp_path):
    async def scenario() -> None:
        async with Harness(tmp_path) as h:
            gate = h.method.moe.gating_matrix().detach()
            await h.send([bytes(f) for f in encode(ATTACKER, Message(MessageKind.GATE_PUBLISH, 0, {"gate": gate}))])
            request = await h.reply()
            assert request is not None
            await h.send([bytes(f) for f in encode(ATTACKER, _expert_reply(h.method, request.meta["req"], [0]))])
            answer = await h.reply()
            assert answer is not None and answer.kind == MessageKind.ERROR
            assert h.method.round_complete()  # aggregated over what it has, no idling to the deadline

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_messages_for_later_rounds_are_held_only_up_to_the_cap(tmp_path):
    from p2pmoe.driver.runner import MAX_HELD_MESSAGES

    async def scenario() -> None:
        async with Harness(tmp_path) as h:
            gate = h.method.moe.gating_matrix().detach()
            frames = [bytes(f) for f in encode(ATTACKER, Message(MessageKind.GATE_PUBLISH, 1, {"gate": gate}))]
            for _ in range(MAX_HELD_MESSAGES + 76):
                await h.send(frames)
            errors = 0
            while (answer := await h.reply()) is not None:
                errors += answer.kind == MessageKind.ERROR
                if errors == 76:
                    break
            assert errors == 76 and len(h.daemon.runner._held) == MAX_HELD_MESSAGES
            # and it still answers at once
            await h.send([bytes(f) for f in encode(ATTACKER, Message(MessageKind.HELLO, 0, meta={"req": 9}))])
            answer = await h.reply()
            assert answer is not None and answer.meta.get("req") == 9

    asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_peer_round_outside_the_run_is_ignored_at_start_up(tmp_path):
    """A hello claiming round 2**62 (or any round past the run) used to end the run at once
    with empty metrics; now the node runs its rounds."""
    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import free_ports

    (port,) = free_ports(1)
    experiment = resolve_experiment(default_config(method="fedmoe-da", rounds=2))
    timing = Timing(startup=3, round_deadline=1, heartbeat=0.2, linger=0.1)
    cfg = NodeConfig(NODE, f"tcp://127.0.0.1:{port}", tmp_path / "node", {ATTACKER: "tcp://127.0.0.1:1"}, experiment, timing)
    daemon = NodeDaemon(cfg, method=_node())

    async def scenario() -> None:
        run = asyncio.create_task(daemon.run())
        context = zmq.asyncio.Context()
        client = context.socket(zmq.DEALER)
        client.setsockopt(zmq.ROUTING_ID, ATTACKER.encode())
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"tcp://127.0.0.1:{port}")
        meta = {"round": 2**62, "done": False, "config": experiment.config_hash, "setting": experiment.canonical}
        await client.send_multipart([bytes(f) for f in encode(ATTACKER, Message(MessageKind.HELLO, 0, meta=meta))])
        await asyncio.wait_for(run, 60)
        client.close()
        context.term()

    asyncio.run(scenario())
    rows = (tmp_path / "node" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and ATTACKER not in daemon.peer_rounds


def test_a_send_to_a_silent_peer_fails_in_a_second_not_the_send_timeout(tmp_path):
    """A configured peer that is not 'alive' (never came, or went quiet) held up every round
    for the transport's 10 s send timeout per message; now it gets SILENT_PEER_SEND_TIMEOUT."""
    import time

    from p2pmoe.node.config import Timing
    from p2pmoe.node.daemon import SILENT_PEER_SEND_TIMEOUT
    from p2pmoe.node.transport import Transport

    timing = Timing(suspect_after=0.1, dead_after=0.2)
    cfg = NodeConfig(
        NODE, "tcp://127.0.0.1:0", tmp_path / "node", {ATTACKER: "tcp://127.0.0.1:1"}, resolve_experiment(default_config(method="fedmoe-da")), timing
    )
    daemon = NodeDaemon(cfg, method=_node())

    async def scenario() -> float:
        daemon.transport = Transport(NODE, "tcp://127.0.0.1:0")
        daemon.transport.add_peer(ATTACKER, "tcp://127.0.0.1:1")
        daemon.membership.state(ATTACKER, time.monotonic())  # the clock starts
        await asyncio.sleep(0.3)  # the peer never answered: dead
        start = time.perf_counter()
        await daemon._send_one(ATTACKER, Message(MessageKind.HEARTBEAT, 0, meta={}))
        elapsed = time.perf_counter() - start
        await daemon.transport.close()
        return elapsed

    assert asyncio.run(scenario()) < SILENT_PEER_SEND_TIMEOUT + 1 < 10
