"""Issue 30, first part: robust aggregation rules exclude a known outlier, and the attacks have
the stated form."""

from __future__ import annotations

import pytest
import torch

from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.methods.attacks import Adversary, attacker_nodes, flip_labels, parse_attack
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.methods.robust import Rule, aggregate, centred_clip, krum_choice, median, parse_rule, trimmed_mean
from p2pmoe.wire.messages import Message, MessageKind, Send


def _states(values: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((3,), v), "b": torch.tensor([v])} for v in values]


HONEST = [0.9, 1.0, 1.1, 1.0, 0.95]


def test_each_rule_keeps_a_wild_upload_from_dragging_the_result():
    states = _states([*HONEST, 1e6])
    counts = [1] * 6
    assert float(aggregate(Rule("mean"), states, counts, states[0])["w"][0]) > 1e5  # the mean is dragged
    assert median(states)["w"].tolist() == pytest.approx([1.0] * 3)
    assert trimmed_mean(states, 0.2)["w"].tolist() == pytest.approx([(0.95 + 1.0 + 1.0 + 1.1) / 4] * 3)  # one dropped from each end
    assert 5 not in krum_choice(states, f=1) and 5 not in krum_choice(states, f=1, m=3)
    centre = {"w": torch.ones(3), "b": torch.ones(1)}
    clipped = centred_clip(states, centre, tau=0.5)
    assert float(clipped["w"][0]) <= 1.0 + 0.5 / 6 * 2  # the outlier moves the result by at most tau / n
    # a liar claiming a billion examples weighs no more than anyone (counts are the sender's claim)
    claimed = aggregate(Rule("clip", tau=0.5), states, [1, 1, 1, 1, 1, 10**9], centre)
    assert claimed["w"].tolist() == pytest.approx(clipped["w"].tolist())
    assert aggregate(Rule("krum", f=1, m=3), states, [1, 1, 1, 1, 1, 10**9], centre)["w"].tolist() == pytest.approx(
        aggregate(Rule("krum", f=1, m=3), states, counts, centre)["w"].tolist()
    )
    nan = _states([*HONEST, float("nan")])
    assert 5 not in krum_choice(nan, f=1, m=5)  # a NaN score never sorts first


def test_rules_are_parsed_with_their_parameters_and_bad_ones_named():
    assert parse_rule("trimmed:0.2") == Rule("trimmed", beta=0.2) and parse_rule("krum:2:3") == Rule("krum", f=2, m=3)
    assert parse_rule("clip:5") == Rule("clip", tau=5.0) and parse_rule("median") == Rule("median")
    for bad in ("trimmed:0.5", "krum", "clip:0", "median:1", "average"):
        with pytest.raises(ValueError, match="aggregation must be"):
            parse_rule(bad)
    with pytest.raises(ValueError, match="needs more than f \\+ 2"):
        krum_choice(_states([1.0, 2.0, 3.0]), f=1)


def test_a_fedavg_server_with_a_robust_rule_aggregates_with_it():
    template = {"w": torch.zeros(3), "b": torch.zeros(1)}
    server = FedAvgServer("server", [f"c{i}" for i in range(6)], template, rule=parse_rule("median"))
    states = _states([*HONEST, -1e6])
    assert server.aggregate(states, [10] * 6)["w"].tolist() == pytest.approx([0.975] * 3)  # even count: the two middle values' mean
    assert float(FedAvgServer("server", ["a"], template).aggregate(states, [10] * 6)["w"][0]) < -1e5


def test_attacks_have_the_stated_form():
    assert parse_attack("mimic-mean+sign-flip:5").flip == 5 and parse_attack("mimic-mean+sign-flip:5").mimic == "mean"
    with pytest.raises(ValueError, match="is not noise:SIGMA"):
        parse_attack("sign-flip:-1")
    update = Message(MessageKind.MODEL_UPDATE, 0, {"w": torch.ones(4)}, {"num_examples": 3})
    flipped = Adversary("a", parse_attack("sign-flip:5"), seed=0).lie(Send("server", update))
    assert flipped.message.tensors["w"].tolist() == [-5.0] * 4 and flipped.message.meta == update.meta  # only the numbers lie
    noisy = Adversary("a", parse_attack("noise:2"), seed=0).lie(Send("server", Message(MessageKind.GOSSIP, 0, {"w": torch.zeros(20_000)})))
    assert float(noisy.message.tensors["w"].std()) == pytest.approx(2.0, rel=0.05)
    hello = Send("b", Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.zeros(2, 3)}))
    mimic = Adversary("a", parse_attack("mimic-mean"), seed=0)
    assert mimic.lie(hello) is hello  # nothing seen yet: its own gate goes out
    mimic.observe("b", Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.ones(2, 3)}))
    mimic.observe("c", Message(MessageKind.GATE_PUBLISH, 0, {"gate": 3 * torch.ones(2, 3)}))
    assert mimic.lie(hello).message.tensors["gate"].tolist() == [[2.0] * 3] * 2  # the neighbours' mean
    assert Adversary("a", parse_attack("sign-flip:1"), seed=0).lie(hello) is hello  # a gate is no shared model tensor
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    filler = Adversary("a", parse_attack("fill:-3e38"), seed=0)  # issue 26 N1: gates and shared tensors alike
    assert torch.equal(filler.lie(hello).message.tensors["gate"], torch.full((2, 3), -3e38))
    assert torch.equal(filler.lie(Send("server", update)).message.tensors["w"], torch.full((4,), -3e38))
    assert parse_attack("fill:3e+38+mimic-mean").fill == pytest.approx(3e38)  # an exponent's + joins nothing
    with pytest.raises(ValueError, match="fill:VALUE"):
        parse_attack("fill:inf")


def test_attackers_are_a_seeded_fraction_and_configured_together():
    clients = [f"node-0{k}" for k in range(10)]
    chosen = attacker_nodes(1, clients, 0.2)
    assert len(chosen) == 2 and chosen == attacker_nodes(1, list(reversed(clients)), 0.2) and chosen != attacker_nodes(2, clients, 0.2)
    resolved = resolve_experiment(default_config(nodes=10, attack="sign-flip:3", attackers=0.3, seed=4))
    assert len(resolved.attackers) == 3 and all(resolved.adversary(n) is not None for n in resolved.attackers)
    assert resolved.adversary(next(n for n in resolved.clients if n not in resolved.attackers)) is None
    with pytest.raises(ValueError, match="go together"):
        resolve_experiment(default_config(nodes=10, attack="sign-flip:3"))
    with pytest.raises(ValueError, match="names no client"):
        resolve_experiment(default_config(nodes=10, attack="mimic:node-77", attackers=0.1))


def test_clipped_gossip_bounds_a_neighbours_pull_and_equals_plain_mixing_for_small_steps():
    from p2pmoe.methods.gossip import GossipExchange
    from p2pmoe.methods.robust import self_centred_mix

    own = {"w": torch.zeros(4)}
    honest, liar = {"w": torch.full((4,), 0.1)}, {"w": torch.full((4,), 1e6)}
    mixed = self_centred_mix(own, [(honest, 0.25), (liar, 0.25)], tau=1.0)
    assert float(mixed["w"].norm()) <= 0.25 * 0.2 + 0.25 * 1.0 + 1e-6  # the liar moved it by at most w * tau
    small = self_centred_mix(own, [(honest, 0.25)], tau=10.0)
    assert small["w"].tolist() == pytest.approx([0.025] * 4)  # under tau: plain Metropolis-Hastings mixing

    written: list = []
    exchange = GossipExchange(["b", "c"], MessageKind.GOSSIP, lambda: {"w": torch.ones(4)}, written.append, clip=1.0)
    exchange.start(0)
    exchange.take("b", Message(MessageKind.GOSSIP, 0, {"w": torch.full((4,), 1.1)}, {"degree": 2}))
    exchange.take("c", Message(MessageKind.GOSSIP, 0, {"w": torch.full((4,), -50.0)}, {"degree": 2}))  # plausible, and far off
    assert exchange.done and float(written[0]["w"].min()) > 0.6  # plain mixing would have given -16
