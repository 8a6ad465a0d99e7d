"""The round driver: serialised calls into a method, failures as events, held messages, a
method plugged in from outside the package, and the summariser's selection rule."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.driver.rounds import drive_rounds, evaluation_due
from p2pmoe.driver.runner import MAX_HELD_MESSAGES, NodeRunner, error_reply
from p2pmoe.driver.summary import select_round
from p2pmoe.methods.base import Method, SendFailure
from p2pmoe.methods.registry import BuildContext, MethodSpec, all_methods, register_method
from p2pmoe.options import Options, option
from p2pmoe.sim.bus import SimNetwork
from p2pmoe.tasks.base import Selection
from p2pmoe.wire.codec import ProtocolError
from p2pmoe.wire.messages import Message, MessageKind, Send


class Recorder(Method):
    """Records every call; `on_message` raises ProtocolError for rounds it refuses."""

    def __init__(self, node_id: str = "me") -> None:
        super().__init__(node_id)
        self.calls: list[tuple] = []
        self.complete = True

    def start_round(self, round_index: int) -> list[Send]:
        self.calls.append(("start", round_index))
        return []

    def on_message(self, src: str, message: Message) -> list[Send]:
        self.calls.append(("message", src, message.kind.value, message.round))
        if message.meta.get("refuse"):
            raise ProtocolError("refused on purpose")
        return []

    def on_send_failed(self, dst: str, failure: SendFailure) -> list[Send]:
        self.calls.append(("failed", dst, failure.kind.value, failure.req, failure.reason))
        return []

    def round_complete(self) -> bool:
        return self.complete


def _msg(kind: MessageKind = MessageKind.GOSSIP, round_index: int = 0, **meta) -> Message:
    return Message(kind, round_index, meta=meta)


def test_deliveries_while_busy_wait_and_are_handed_over_in_order_after_the_call():
    runner = NodeRunner("me", method := Recorder())
    runner.round = 0
    runner.blocking_call(lambda: None)  # training round 1 is about to start
    assert runner.deliver("a", _msg(round_index=0)) == []
    assert runner.deliver("b", _msg(round_index=1)) == []
    assert method.calls == []  # nothing reaches the method while it trains
    runner.start(1)
    # the old round's message first (the method is still at round 0), then start, then round 1's
    assert method.calls == [("message", "a", "gossip", 0), ("start", 1), ("message", "b", "gossip", 1)]


def test_messages_for_rounds_not_started_are_held_until_then():
    runner = NodeRunner("me", method := Recorder())
    runner.start(0)
    runner.deliver("a", _msg(round_index=2))
    runner.start(1)
    assert ("message", "a", "gossip", 2) not in method.calls
    runner.start(2)
    assert method.calls[-1] == ("message", "a", "gossip", 2)


def test_holding_is_bounded_and_a_dropped_message_gets_an_error():
    runner = NodeRunner("me", Recorder())
    runner.start(0)
    far = runner.deliver("a", _msg(round_index=5))
    assert far[0].message.kind == MessageKind.ERROR and "ahead" in far[0].message.meta["reason"]
    for i in range(MAX_HELD_MESSAGES):
        assert runner.deliver("a", _msg(round_index=1, req=i)) == []
    over = runner.deliver("a", _msg(round_index=1, req=-1))
    assert over[0].dst == "a" and "holds 1024 messages" in over[0].message.meta["reason"]


def test_a_retried_request_that_is_still_held_is_answered_once():
    runner = NodeRunner("me", method := Recorder())
    runner.start(0)
    runner.blocking_call(lambda: None)
    for _ in range(3):
        runner.deliver("a", _msg(MessageKind.EXPERT_REQUEST, 0, req=7, slots=[0]))
    runner.resume()
    assert method.calls.count(("message", "a", "expert_request", 0)) == 1


def test_a_refused_message_is_answered_with_an_error_that_becomes_the_senders_failure_event():
    receiver, sender = NodeRunner("b", Recorder("b")), NodeRunner("a", sender_method := Recorder("a"))
    receiver.start(0)
    sender.start(0)
    request = _msg(MessageKind.EXPERT_REQUEST, 0, req=3, refuse=True)
    [reply] = receiver.deliver("a", request)
    assert reply.dst == "a" and reply.message == error_reply(request, "refused on purpose")
    assert sender.deliver("b", reply.message) == []
    assert sender_method.calls[-1] == ("failed", "b", "expert_request", 3, "refused on purpose")


def test_a_method_bug_is_an_error_reply_in_a_daemon_and_raises_in_the_simulator():
    class Buggy(Recorder):
        def on_message(self, src, message):
            raise KeyError("bug")

    daemon_side = NodeRunner("me", Buggy())
    daemon_side.start(0)
    [reply] = daemon_side.deliver("a", _msg())
    assert reply.message.meta["reason"] == "internal error"
    strict = NodeRunner("me", Buggy(), strict=True)
    strict.start(0)
    with pytest.raises(KeyError):
        strict.deliver("a", _msg())


def test_each_node_draws_from_its_own_rng_stream_whatever_ran_before():
    class Draw(Recorder):
        def train_local(self, round_index):
            return {"x": float(torch.rand(()))}

    alone = NodeRunner("me", Draw(), seed=5).train(0)
    torch.rand(1000)  # other nodes' draws in the same process
    other = NodeRunner("other", Draw(), seed=6)
    other.train(0)
    assert NodeRunner("me", Draw(), seed=5).train(0) == alone


def test_evaluation_is_due_every_n_rounds_and_after_the_last():
    assert [r for r in range(7) if evaluation_due(r, 7, 3)] == [2, 5, 6]


def test_selection_takes_the_best_mean_key_over_clients_or_the_last_round():
    rows = [
        {"round": 0, "node": "a", "metrics": {"valid_mrr": 0.2, "mrr": 0.1}},
        {"round": 0, "node": "b", "metrics": {"valid_mrr": 0.4, "mrr": 0.3}},
        {"round": 1, "node": "a", "metrics": {"valid_mrr": 0.1, "mrr": 0.5}},
        {"round": 1, "node": "b", "metrics": {"valid_mrr": 0.3, "mrr": 0.5}},
        {"round": 2, "node": "server", "train": {}},
    ]
    assert select_round(rows, ["a", "b"], Selection("valid_mrr")) == (0, {"a": rows[0]["metrics"], "b": rows[1]["metrics"]})
    assert select_round(rows, ["a", "b"], Selection())[0] == 1


# -- a method written outside the package: one class, one options dataclass, one registration --


@dataclass(frozen=True)
class EchoOptions(Options):
    section: ClassVar[str] = "method"
    copies: int = option(1, "messages each client sends the next one per round", minimum=1)


class Echo(Method):
    """A toy ring method: each client sends `copies` messages to the next client per round."""

    def __init__(self, node_id: str, successor: str, copies: int, learner) -> None:
        super().__init__(node_id)
        self.successor, self.copies, self.learner = successor, copies, learner
        self.awaited = 0

    def start_round(self, round_index: int) -> list[Send]:
        self.awaited = self.copies
        return [Send(self.successor, Message(MessageKind.GOSSIP, round_index, meta={"i": i})) for i in range(self.copies)]

    def on_message(self, src: str, message: Message) -> list[Send]:
        self.awaited -= 1
        return []

    def round_complete(self) -> bool:
        return self.awaited <= 0

    def evaluate(self) -> dict[str, float]:
        return self.learner.evaluate()


def _echo_client(ctx: BuildContext[EchoOptions], node: str) -> Method:
    k = ctx.index(node)
    return Echo(node, ctx.clients[(k + 1) % len(ctx.clients)], ctx.options.copies, ctx.learner(node))


def test_a_method_from_outside_the_package_runs_with_its_own_options(fkcb_like, tmp_path, monkeypatch):
    from p2pmoe.methods import registry

    monkeypatch.setattr(registry, "_METHODS", dict(all_methods()))  # registered for this test only
    register_method(MethodSpec("echo", "a toy ring", frozenset({"domain_sequences"}), EchoOptions, _echo_client, flag_prefix="echo"))
    cfg = with_options(
        default_config(method="echo", data="fkcb", data_root=str(fkcb_like), rounds=2, out=str(tmp_path)),
        task_options={"embed_dim": 8, "max_len": 8, "negatives": 20},
        method_options={"copies": 3},
    )
    from p2pmoe.sim.runner import run_simulation

    summary = run_simulation(cfg, progress=False)
    assert summary["bytes"]["messages"] == 3 * 3 * 2  # 3 clients x 3 copies x 2 rounds
    assert summary["setting"]["method"] == {"copies": 3} and "mrr" in summary["metrics"]


def test_the_simulator_honours_eval_every_and_keeps_training_statistics_apart(fkcb_like, tmp_path):
    cfg = with_options(
        default_config(method="local", data="fkcb", data_root=str(fkcb_like), rounds=3, eval_every=2, out=str(tmp_path)),
        task_options={"embed_dim": 8, "max_len": 8, "negatives": 20},
    )
    from p2pmoe.sim.runner import run_simulation

    summary = run_simulation(cfg, progress=False)
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in rows if "metrics" in r}) == [1, 2]
    assert all("train_loss" in r["train"] and "train_loss" not in r.get("metrics", {}) for r in rows)
    assert summary["selection"]["round"] in (1, 2) and "train_loss" in summary["train"]


def test_a_node_whose_peer_never_answers_reaches_its_deadline_in_the_simulator():
    class Waiting(Recorder):
        def start_round(self, round_index):
            self.complete = False
            return []

        def on_deadline(self, round_index):
            self.calls.append(("deadline", round_index))
            self.complete = True
            return []

    network = SimNetwork({"a": (waiting := Waiting("a")), "b": Recorder("b")})
    network.run_round(0)
    assert ("deadline", 0) in waiting.calls


def test_a_send_to_a_node_outside_the_run_is_a_failure_event():
    class Sender(Recorder):
        def start_round(self, round_index):
            return [Send("ghost", _msg(MessageKind.EXPERT_REQUEST, round_index, req=1))]

    network = SimNetwork({"a": (sender := Sender("a"))})
    asyncio.run(network.run(1, first=0))
    assert sender.calls[-1][:4] == ("failed", "ghost", "expert_request", 1)


def test_drive_rounds_stops_mid_round_without_logging_it():
    class StopPort:
        def __init__(self):
            self.done = []
            self.stop = False

        async def send(self, node, sends):
            pass

        async def blocking(self, fn, *args):
            return fn(*args)

        async def wait(self, node, timeout):
            self.stop = True  # SIGTERM arrives while the round waits for peers
            return False

        def stopping(self):
            return self.stop

        async def round_done(self, node, r, train, metrics):
            self.done.append(r)

    port = StopPort()
    last = asyncio.run(drive_rounds(NodeRunner("me", Recorder()), port, 3, 10, 1, 5.0))
    assert last == 2 and port.done == []  # round 3 was not completed, so not checkpointed either


class Blending(Recorder):
    """Training adds 1 to its one number; the round's exchange multiplies it by 10."""

    def __init__(self, node_id: str = "me") -> None:
        super().__init__(node_id)
        self.value = 0

    def train_local(self, round_index):
        self.value += 1
        return {}

    def start_round(self, round_index):
        self.value *= 10
        return []

    def evaluate(self):
        return {"value": float(self.value)}


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ("aggregated", [{"value": 10.0}, {"value": 110.0}]),
        ("trained", [{"value": 1.0}, {"value": 11.0}]),
        ("both", [{"value@trained": 1.0, "value": 10.0}, {"value@trained": 11.0, "value": 110.0}]),
    ],
)
def test_the_evaluation_point_is_after_the_exchange_after_local_training_or_both(point, expected):
    network = SimNetwork({"me": Blending()})
    rows = asyncio.run(network.run(2, first=0, eval_point=point))
    assert [row["metrics"] for row in rows] == expected


def test_an_unknown_evaluation_point_is_refused():
    with pytest.raises(ValueError, match="eval_point"):
        asyncio.run(SimNetwork({"me": Blending()}).run(1, eval_point="sometime"))
    with pytest.raises(ValueError, match="eval_point"):
        default_config(eval_point="sometime")


def test_peer_text_in_log_lines_is_clipped_and_repeats_are_rate_limited(caplog):
    """Issue 26 N7: a 650 KB setting from a peer is not a 750 KB log line, and a flood of the
    same refusal logs a few lines, not one per message."""
    import logging

    from p2pmoe.driver.runner import RateLimitedLog, clip

    assert clip("x" * 10) == "x" * 10
    long = clip("k" * 650_000)
    assert len(long) < 300 and long.endswith("(650000 characters)")
    noise = RateLimitedLog(first=3, every=1000, logger=logging.getLogger("test.noise"))
    with caplog.at_level(logging.WARNING, logger="test.noise"):
        for _ in range(30):
            noise.warning("refused", "refusing %s", clip("k" * 650_000))
    assert len(caplog.records) == 3 and sum(len(r.getMessage()) for r in caplog.records) < 1000


def test_failures_and_membership_changes_during_training_reach_the_method_after_it_in_order():
    """Issue 27 item 4: every event is serialised, not only deliveries."""

    class Members(Recorder):
        def train_local(self, round_index):
            self.calls.append(("train", round_index))
            return {}

        def on_peer_lost(self, peer):
            self.calls.append(("lost", peer))
            return []

        def on_peer_joined(self, peer):
            self.calls.append(("joined", peer))
            return []

    runner = NodeRunner("me", method := Members())
    runner.start(0)
    call = runner.blocking_call(runner.train, 1)  # the daemon runs this in a worker thread
    assert runner.busy
    runner.failed("b", SendFailure(MessageKind.EXPERT_REQUEST, 0, "gone", "timeout", 4))
    runner.peer_lost("b")
    runner.deliver("c", _msg(round_index=1))
    runner.peer_joined("b")
    assert method.calls == [("start", 0)]  # nothing while training
    call()
    runner.start(1)
    assert method.calls == [
        ("start", 0),
        ("train", 1),
        ("failed", "b", "expert_request", 4, "gone"),
        ("lost", "b"),
        ("joined", "b"),  # events belong to no round: handed over before the new round starts
        ("start", 1),
        ("message", "c", "gossip", 1),
    ]
