"""FMoE-CDSR's client and caching server on the in-memory bus, and FedSASRec's encoder-only FedAvg."""

from __future__ import annotations

import random

import pytest
import torch

from p2pmoe.data.sequences import DomainSequences
from p2pmoe.learners.sequential import NextItemLearner, SASRecNextItem
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.methods.fedsasrec import FedSASRecClient, encoder_template
from p2pmoe.methods.fmoe_cdsr import FMoECDSRClient, FMoECDSRServer, OwnExpertAverageClient, domain_tensors
from p2pmoe.models.fmoe_cdsr import FMoECDSR, transition_adjacency
from p2pmoe.models.params import float_state, weighted_average
from p2pmoe.sim.bus import SimNetwork
from p2pmoe.wire.codec import ProtocolError
from p2pmoe.wire.messages import Message, MessageKind

K, L, D = 3, 5, 8
ITEMS = (20, 24, 18)  # item ids are per domain: every domain has its own catalogue


def domain(c: int, n_train: int = 16) -> DomainSequences:
    rng = random.Random(c)
    n = ITEMS[c]

    def draw(count: int, lo: int) -> list[list[int]]:
        return [[rng.randrange(n) for _ in range(rng.randint(lo, 6))] for _ in range(count)]

    return DomainSequences(f"d{c}", n, draw(n_train, 2), draw(4, 3), draw(4, 3), [0] * n_train, [0] * 4, [0] * 4)


def learner(c: int) -> NextItemLearner:
    data = domain(c)
    torch.manual_seed(c)
    model = FMoECDSR(ITEMS[c], K, c, transition_adjacency(data.train, ITEMS[c]), max_len=L, hidden=D, heads=2, blocks=1, gate_hidden=(16, 8))
    return NextItemLearner(model, data, max_len=L, batch_size=16, num_negatives=5)


def federation(freeze_foreign: bool = True) -> dict:
    nodes: dict = {f"c{c}": FMoECDSRClient(f"c{c}", learner(c), c, "server", local_epochs=1, freeze_foreign=freeze_foreign) for c in range(K)}
    nodes["server"] = FMoECDSRServer("server", {f"c{c}": c for c in range(K)}, nodes["c0"].model.expert_state(0))
    return nodes


def upload(nodes: dict, client: str, round_index: int = 0) -> Message:
    return nodes[client].start_round(round_index)[0].message


def test_a_round_moves_one_expert_up_and_the_others_down():
    nodes = federation()
    ledger = ByteLedger()
    bus = SimNetwork(nodes, ledger)
    bus.run_round(0)
    expert_bytes = 4 * sum(t.numel() for t in nodes["c0"].model.expert_state(0).values())
    for c in range(K):
        ups = [e for e in ledger.entries if e.src == f"c{c}"]
        downs = [e for e in ledger.entries if e.dst == f"c{c}"]
        assert [(e.dst, e.kind, e.payload_bytes) for e in ups] == [("server", "model_update", expert_bytes)]
        assert [(e.src, e.kind, e.payload_bytes) for e in downs] == [("server", "model_global", (K - 1) * expert_bytes)]
    # Round 0's reply carries the others' round-0 experts; they are loaded before round 1 trains.
    c0 = nodes["c0"]
    assert sorted(c0.pending) == [1, 2] and c0.model.available.tolist() == [True, False, False]
    uploaded = nodes["c1"].model.expert_state(1)
    assert all(torch.equal(c0.pending[1][k], v) for k, v in uploaded.items())
    c0.train_local(1)
    assert c0.model.available.tolist() == [True, True, True] and c0.pending == {}
    assert all(torch.equal(c0.model.experts[1].state_dict()[k], v) for k, v in uploaded.items())
    held = {id(p) for g in c0.learner.optimizer.param_groups for p in g["params"]}
    assert not held & {id(p) for i in (1, 2) for p in c0.model.experts[i].parameters()}
    assert {"valid_mrr", "mrr"} <= set(c0.evaluate())


def test_without_freezing_foreign_experts_train_locally():
    nodes = federation(freeze_foreign=False)
    SimNetwork(nodes).run_round(0)
    c0 = nodes["c0"]
    received = c0.pending[1]
    c0.train_local(1)
    held = {id(p) for g in c0.learner.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in c0.model.experts[1].parameters()} <= held
    after = c0.model.expert_state(1)
    assert not all(torch.equal(after[k], v) for k, v in received.items())


def test_server_cache_round_trips_and_rejects_bad_state():
    nodes = federation()
    SimNetwork(nodes).run_round(0)
    server = nodes["server"]
    state = server.state_dict()
    assert sorted({name.split(".")[1] for name in state}) == ["0", "1", "2"]
    fresh = FMoECDSRServer("server", server.domain_of, server.template)
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    name = next(iter(state))
    for bad in ({**state, name: torch.zeros(1)}, {**state, "domain.7." + name.split(".", 2)[2]: state[name]}, {**state, "junk": torch.zeros(1)}):
        with pytest.raises(ProtocolError):
            fresh.load_state_dict(bad)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_server_rejects_bad_uploads_and_changes_nothing():
    nodes = federation()
    server = nodes["server"]
    server.start_round(0)
    good = upload(nodes, "c0")
    name = next(iter(good.tensors))
    bad_uploads = {
        "shape": Message(MessageKind.MODEL_UPDATE, 0, {**good.tensors, name: torch.zeros(2)}, good.meta),
        "dtype": Message(MessageKind.MODEL_UPDATE, 0, {**good.tensors, name: good.tensors[name].double()}, good.meta),
        "names": Message(MessageKind.MODEL_UPDATE, 0, {"x" + k: v for k, v in good.tensors.items()}, good.meta),
        "missing": Message(MessageKind.MODEL_UPDATE, 0, {k: v for k, v in good.tensors.items() if k != name}, good.meta),
        "domain": Message(MessageKind.MODEL_UPDATE, 0, good.tensors, {"domain": 1}),
        "round": Message(MessageKind.MODEL_UPDATE, 3, good.tensors, good.meta),
    }
    for reason, message in bad_uploads.items():
        with pytest.raises(ProtocolError):
            server.on_message("c0", message)
        assert server.cache == {}, reason
    with pytest.raises(ProtocolError, match="not a client"):
        server.on_message("mallory", good)
    assert server.on_message("c0", good) == [] and list(server.cache) == [0]


def test_a_lost_client_does_not_stall_the_round():
    nodes = federation()
    server = nodes["server"]
    server.start_round(0)
    assert server.on_message("c0", upload(nodes, "c0")) == []
    assert server.on_message("c1", upload(nodes, "c1")) == []
    sends = server.on_peer_lost("c2")
    assert server.round_complete() and sorted(s.dst for s in sends) == ["c0", "c1"]
    to_c0 = next(s.message for s in sends if s.dst == "c0")
    assert {name.split(".")[1] for name in to_c0.tensors} == {"1"}  # domain 2 never uploaded


def test_server_deadline_sends_what_it_has():
    nodes = federation()
    server = nodes["server"]
    server.start_round(0)
    server.on_message("c1", upload(nodes, "c1"))
    sends = server.on_deadline(0)
    assert server.round_complete() and sorted(s.dst for s in sends) == ["c0", "c1", "c2"]
    assert next(s.message for s in sends if s.dst == "c1").tensors == {}


def test_client_rejects_bad_downloads_and_keeps_what_it_had():
    nodes = federation()
    client = nodes["c0"]
    client.start_round(0)
    others = domain_tensors({1: nodes["c1"].model.expert_state(1)})
    name = next(iter(others))
    own = domain_tensors({0: nodes["c1"].model.expert_state(0)})
    for tensors in ({**others, name: torch.zeros(2)}, {**others, **own}, {"domain.x.y": torch.zeros(1)}):
        with pytest.raises(ProtocolError):
            client.on_message("server", Message(MessageKind.MODEL_GLOBAL, 0, tensors))
        assert client.pending == {} and not client.round_complete()
    with pytest.raises(ProtocolError):
        client.on_message("server", Message(MessageKind.MODEL_GLOBAL, 1, others))
    with pytest.raises(ProtocolError):
        client.on_message("c1", Message(MessageKind.MODEL_GLOBAL, 0, others))
    client.on_message("server", Message(MessageKind.MODEL_GLOBAL, 0, others))
    assert sorted(client.pending) == [1] and client.round_complete()


def test_client_checkpoint_keeps_received_experts():
    nodes = federation()
    SimNetwork(nodes).run_round(0)
    saved = nodes["c0"].state_dict()
    assert any(k.startswith("pending.domain.1.") for k in saved)
    restored = FMoECDSRClient("c0", learner(0), 0, "server")
    restored.load_state_dict(saved)
    assert sorted(restored.pending) == [1, 2]
    restored.train_local(1)
    assert restored.model.available.all()


def test_fedsasrec_averages_only_the_encoder():
    learners = [NextItemLearner(SASRecNextItem(ITEMS[c], L, D, 2, 1, 0.0), domain(c, n_train=8 + 8 * c), max_len=L, num_negatives=5) for c in range(2)]
    assert encoder_template(learners[0].model).keys() == encoder_template(learners[1].model).keys()
    clients = {f"c{c}": FedSASRecClient(f"c{c}", lrn, "server") for c, lrn in enumerate(learners)}
    server = FedAvgServer("server", list(clients), encoder_template(learners[0].model))
    trained = []
    for client in clients.values():
        client.train_local(0)
        trained.append(float_state(client.learner.model))
    server.start_round(0)
    replies = []
    for node, client in clients.items():
        (send,) = client.start_round(0)
        assert send.message.tensors.keys() == encoder_template(learners[0].model).keys()
        replies += server.on_message(node, send.message)
    for send in replies:
        clients[send.dst].on_message("server", send.message)
    expected = weighted_average([{k: v for k, v in s.items() if k.startswith("encoder.")} for s in trained], [8, 16])
    for lrn, before in zip(learners, trained, strict=True):
        after = float_state(lrn.model)
        assert all(torch.equal(after[k], v) for k, v in expected.items())
        assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("encoder."))


def test_server_keeps_the_experts_of_the_first_rounds_only_when_told():
    """Table 5's setting: after `store_rounds` rounds the cache no longer changes, so every
    later download carries the experts as they were after those rounds of training."""
    nodes = federation()
    nodes["server"] = FMoECDSRServer("server", {f"c{c}": c for c in range(K)}, nodes["c0"].model.expert_state(0), store_rounds=1)
    bus = SimNetwork(nodes)
    bus.run_round(0)
    kept = {k: v.clone() for k, v in nodes["server"].state_dict().items()}
    bus.run_round(1)
    trained = nodes["c1"].model.expert_state(1)
    assert not all(torch.equal(trained[k], kept["domain.1." + k]) for k in trained)  # c1's expert moved on in round 1 ...
    assert all(torch.equal(nodes["server"].state_dict()[k], v) for k, v in kept.items())  # ... the cache did not
    assert all(torch.equal(nodes["c0"].pending[1][k], kept["domain.1." + k]) for k in trained)
    with pytest.raises(ValueError):
        FMoECDSRServer("server", {"c0": 0}, nodes["c0"].model.expert_state(0), store_rounds=0)


def test_branch_fedavg_averages_the_own_experts_and_keeps_everything_else():
    learners = [learner(c) for c in range(K)]
    clients = {f"c{c}": OwnExpertAverageClient(f"c{c}", lrn, "server", local_epochs=1) for c, lrn in enumerate(learners)}
    template = {"expert." + k: v for k, v in learners[0].model.expert_state(0).items()}
    server = FedAvgServer("server", list(clients), template)
    server.start_round(0)
    trained, replies = [], []
    for node, client in clients.items():
        (send,) = client.start_round(0)
        trained.append(float_state(client.model))
        replies += server.on_message(node, send.message)
    expected = weighted_average([{k: s[f"experts.{c}.{k}"] for k in learners[0].model.expert_state(0)} for c, s in enumerate(trained)], [16] * K)
    for send in replies:
        clients[send.dst].on_message("server", send.message)
    for c, (lrn, before) in enumerate(zip(learners, trained, strict=True)):
        after = float_state(lrn.model)
        assert all(torch.equal(after[f"experts.{c}.{k}"], v) for k, v in expected.items())
        assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith(f"experts.{c}."))
        assert lrn.model.live_branches() == [c]
    bad = Message(MessageKind.MODEL_GLOBAL, 1, {k: torch.full_like(v, float("nan")) for k, v in template.items()})
    kept = float_state(learners[0].model)
    with pytest.raises(ValueError):
        clients["c0"].adopt(bad)
    assert all(torch.equal(float_state(learners[0].model)[k], v) for k, v in kept.items())
