"""FedMoE-DA's cheaper ways of sharing phi: random-matching gossip, gossip every I rounds,
8-bit phi with error feedback, and a pretrained frozen phi."""

import gzip
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from p2pmoe.config import default_config, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.fedmoe_da import EMBEDDING_PREFIX, FedMoEDANode, FedMoEDAOptions
from p2pmoe.methods.gossip import GossipExchange, RandomMatchings, every
from p2pmoe.models import MoEClassifier
from p2pmoe.models.params import float_state
from p2pmoe.models.pretrained import PretrainedError, load_pretrained, read_metadata
from p2pmoe.participation import Participation
from p2pmoe.sim.bus import SimNetwork
from p2pmoe.tasks.image import pretrain_embedder
from p2pmoe.wire.compression import ErrorFeedback, round_trip
from p2pmoe.wire.messages import MessageKind

IDS = ["n0", "n1", "n2", "n3"]


# -- random matchings ---------------------------------------------------------------------


def test_matching_is_symmetric_maximal_on_topology_edges_and_the_same_in_every_process():
    graph = nx.random_regular_graph(4, 12, seed=1)
    graph = nx.relabel_nodes(graph, {k: f"node-{k:02d}" for k in graph.nodes})
    here, there = RandomMatchings(graph, seed=7), RandomMatchings(graph.copy(), seed=7)  # two daemons
    seen = []
    for r in range(6):
        pairs = here.pairs(r)
        assert pairs == there.pairs(r)
        assert all(pairs[b] == a for a, b in pairs.items())
        assert all(graph.has_edge(a, b) for a, b in pairs.items())
        assert not any(a not in pairs and b not in pairs for a, b in graph.edges)  # maximal
        seen.append(frozenset(pairs.items()))
    assert len(set(seen)) > 1  # a new matching each round
    assert RandomMatchings(graph, seed=8).pairs(0) != here.pairs(0)


def test_under_partial_participation_only_sampled_neighbours_are_matched():
    graph = nx.random_regular_graph(4, 20, seed=2)
    graph = nx.relabel_nodes(graph, {k: f"node-{k:02d}" for k in graph.nodes})
    participation = Participation(seed=3, fraction=0.5, clients=sorted(graph.nodes))
    matchings = RandomMatchings(graph, seed=7, participation=participation)
    for r in range(6):
        sampled = participation.sampled(r)
        pairs = matchings.pairs(r)
        assert pairs and set(pairs) <= sampled
        # maximal over the sampled subgraph: no edge between two sampled nodes is left with both ends unmatched
        assert not any(a in sampled and b in sampled and a not in pairs and b not in pairs for a, b in graph.edges)


def _exchanges(partners_of, values):
    """One gossip round over scalar 'phi's: every node's exchange, messages delivered."""
    state = {n: {"w": torch.tensor([v])} for n, v in values.items()}
    graph_neighbours = {n: [m for m in values if m != n] for n in values}
    ex = {
        n: GossipExchange(graph_neighbours[n], MessageKind.EMBEDDING, lambda n=n: dict(state[n]), lambda s, n=n: state.__setitem__(n, s), partners_of(n))
        for n in values
    }
    sends = {n: ex[n].start(0) for n in values}
    for n, out in sends.items():
        for send in out:
            ex[send.dst].take(n, send.message)
    assert all(e.done for e in ex.values())
    return {n: float(s["w"]) for n, s in state.items()}, sends


def test_matched_pairs_average_pairwise_and_keep_the_swarm_mean():
    graph = nx.complete_graph(5)
    graph = nx.relabel_nodes(graph, {k: f"n{k}" for k in graph.nodes})
    matchings = RandomMatchings(graph, seed=3)
    values = {f"n{k}": float(k * k) for k in range(5)}
    after, sends = _exchanges(matchings.partners, values)
    pairs = matchings.pairs(0)
    assert len(pairs) == 4  # five nodes: two pairs, one left out
    for n, out in sends.items():
        assert [s.dst for s in out] == ([pairs[n]] if n in pairs else [])
        assert all(s.message.meta["degree"] == 1 for s in out)
    for n, v in after.items():
        assert v == pytest.approx((values[n] + values[pairs[n]]) / 2 if n in pairs else values[n])
    assert sum(after.values()) == pytest.approx(sum(values.values()))


def test_every_skips_the_rounds_in_between():
    schedule = every(3, lambda r: ["b"])
    assert [list(schedule(r)) for r in range(7)] == [["b"], [], [], ["b"], [], [], ["b"]]


# -- FedMoE-DA nodes ----------------------------------------------------------------------


def _learner(seed: int) -> ImageClassifierLearner:
    torch.manual_seed(0)
    model = MoEClassifier(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), 8, 3, 8, 2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, seed % 4] > 0).long()
    return ImageClassifierLearner(model, (x, y), (x[:16], y[:16]), batch_size=16, lr=0.1, seed=seed)


def _ring(i: int) -> list[str]:
    return [IDS[(i - 1) % 4], IDS[(i + 1) % 4]]


def _nodes(embedding="gossip", feedback=None, interval=1, phi=None):
    """Four nodes on a ring; phi gossiped with both ring neighbours on rounds divisible by `interval`."""
    return {
        n: FedMoEDANode(
            n,
            _learner(i),
            [m for m in IDS if m != n],
            _ring(i),
            embedding=embedding,
            embedding_partners=every(interval, lambda r, i=i: _ring(i)) if embedding == "gossip" else None,
            embedding_feedback=feedback() if feedback else None,
            phi=phi,
        )
        for i, n in enumerate(IDS)
    }


def test_gossip_every_second_round_sends_phi_only_then():
    ledger = ByteLedger()
    bus = SimNetwork(_nodes(interval=2), ledger)
    for r in range(4):
        bus.run_round(r)
    assert sorted({e.round for e in ledger.entries if e.kind == "embedding"}) == [0, 2]


def test_int8_phi_with_error_feedback_is_billed_at_a_byte_a_value_and_its_residual_is_checkpointed():
    nodes = _nodes(feedback=lambda: ErrorFeedback("int8"))
    ledger = ByteLedger()
    bus = SimNetwork(nodes, ledger, compression={"embedding": "int8"})
    before = float_state(nodes["n0"].learner.model, EMBEDDING_PREFIX)
    bus.run_round(0)
    phi_values = sum(t.numel() for t in before.values())
    embedding = [e for e in ledger.entries if e.kind == "embedding"]
    assert len(embedding) == 8 and all(e.payload_bytes == phi_values for e in embedding)  # 1 byte, not 4

    node = nodes["n0"]
    residual = node.gossip.feedback.residual
    assert set(residual) == set(before) and any(bool(t.abs().max() > 0) for t in residual.values())
    state = node.state_dict()
    assert all(torch.equal(state["phi_residual." + k], v) for k, v in residual.items())
    fresh = _nodes(feedback=lambda: ErrorFeedback("int8"))["n0"]
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.gossip.feedback.residual[k], v) for k, v in residual.items())


def test_what_a_neighbour_mixes_in_is_the_wires_round_trip_of_phi_plus_residual():
    nodes = _nodes(feedback=lambda: ErrorFeedback("int8"))
    bus = SimNetwork(nodes, ByteLedger(), compression={"embedding": "int8"})
    received = {}
    original_take = nodes["n1"].gossip.take

    def spy(src, message):
        received[src] = message.tensors
        original_take(src, message)

    nodes["n1"].gossip.take = spy
    sent = []
    original_apply = nodes["n0"].gossip.feedback.apply
    nodes["n0"].gossip.feedback.apply = lambda t: sent.append(original_apply(t)) or sent[-1]
    bus.run_round(0)
    bus.run_round(1)
    expected = round_trip(sent[-1], "int8")
    assert all(torch.equal(received["n0"][k], expected[k]) for k in expected)


def test_pretrained_phi_is_loaded_frozen_and_never_sent():
    phi = {k: torch.full_like(v, 0.25) for k, v in float_state(_learner(0).model, EMBEDDING_PREFIX).items()}
    nodes = _nodes(embedding="pretrained", phi=phi)
    ledger = ByteLedger()
    bus = SimNetwork(nodes, ledger)
    for r in range(2):
        bus.run_round(r)
    assert "embedding" not in {e.kind for e in ledger.entries}
    for node in nodes.values():
        now = float_state(node.learner.model, EMBEDDING_PREFIX)
        assert all(torch.equal(now[k], phi[k]) for k in phi)  # trained two rounds, phi unmoved
    with pytest.raises(ValueError, match="pretrained"):
        _nodes(embedding="pretrained")


# -- options and building -----------------------------------------------------------------


def test_options_refuse_combinations_that_would_be_ignored():
    with pytest.raises(ValueError, match="phi_path"):
        FedMoEDAOptions(embedding="pretrained")
    with pytest.raises(ValueError, match="phi_path"):
        FedMoEDAOptions(phi_path="phi.safetensors")
    with pytest.raises(ValueError, match="gossip"):
        FedMoEDAOptions(embedding="frozen", embedding_error_feedback=True)
    FedMoEDAOptions(embedding="frozen")  # the gossip schedule's defaults do not stand in the way of other modes
    with pytest.raises(ValueError, match="embedding_peers"):
        FedMoEDAOptions(embedding_peers="one")


def _cfg(method_options, **run):
    base = default_config(data="fmnist", method="fedmoe-da", nodes=6, topology="random-regular:2", train="none", **run)
    return with_options(base, method_options=method_options)


def test_error_feedback_needs_the_wire_to_compress_phi():
    with pytest.raises(ValueError, match="compression embedding=int8"):
        build_experiment(resolve_experiment(_cfg({"embedding_error_feedback": True})))
    nodes = build_experiment(resolve_experiment(_cfg({"embedding_error_feedback": True, "embedding_peers": "matching"}, compression="embedding=int8"))).nodes
    assert all(node.gossip.feedback.scheme == "int8" for node in nodes.values())


def test_matching_gossip_over_a_built_swarm_sends_at_most_one_phi_per_node_and_round():
    exp = build_experiment(resolve_experiment(_cfg({"embedding_peers": "matching", "embedding_every": 1}, seed=5)))
    ledger = ByteLedger()
    bus = SimNetwork(exp.nodes, ledger, accounting=True)
    for r in range(3):
        bus.run_round(r)
        sent = [e.src for e in ledger.entries if e.kind == "embedding" and e.round == r]
        assert sent and len(sent) == len(set(sent))
        assert all(exp.graph.has_edge(e.src, e.dst) for e in ledger.entries if e.kind == "embedding")


# -- pretrained phi -----------------------------------------------------------------------


def _tiny_digits(path: Path, per_class: int = 10) -> Path:
    """A synthetic MNIST-5k CSV: class c lights up row band c (learnable in one epoch)."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(10):
        for _ in range(per_class):
            image = rng.integers(0, 40, size=(28, 28))
            image[2 * c + 3 : 2 * c + 6] = 255
            rows.append(",".join(map(str, [*image.reshape(-1), c])))
    with gzip.open(path, "wt", encoding="ascii") as f:
        f.write("\n".join(rows) + "\n")
    return path


def test_pretrain_then_every_node_of_a_run_loads_it_frozen(tmp_path):
    out = tmp_path / "phi.safetensors"
    meta = pretrain_embedder(out, "mnist5k", str(_tiny_digits(tmp_path / "digits.csv.gz")), embed_dim=64, epochs=1, batch_size=16)
    assert read_metadata(out) == meta and meta["data"] == "mnist5k" and meta["train_examples"] == "80" and 0 <= float(meta["test_accuracy"]) <= 1
    exp = build_experiment(resolve_experiment(_cfg({"embedding": "pretrained", "phi_path": str(out)})))
    saved = load_pretrained(out, float_state(next(iter(exp.nodes.values())).learner.model, EMBEDDING_PREFIX))
    for node in exp.nodes.values():
        model = node.learner.model
        assert all(torch.equal(float_state(model, EMBEDDING_PREFIX)[k], v) for k, v in saved.items())
        assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(EMBEDDING_PREFIX))
    with pytest.raises(PretrainedError, match="embed-dim"):  # a phi of another width does not fit
        build_experiment(resolve_experiment(with_options(_cfg({"embedding": "pretrained", "phi_path": str(out)}), task_options={"embed_dim": 32})))


def test_pretrained_files_are_checked_before_use(tmp_path):
    like = {"embedder.w": torch.zeros(2, 3), "embedder.b": torch.zeros(3)}

    def write(name, tensors):
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    good = write("good", {"embedder.w": torch.ones(2, 3), "embedder.b": torch.ones(3)})
    assert torch.equal(load_pretrained(good, like)["embedder.w"], torch.ones(2, 3))
    cases = {
        "no such file": tmp_path / "absent",
        "not a readable safetensors": tmp_path / "junk",
        "missing \\['embedder.b'\\]": write("names", {"embedder.w": torch.ones(2, 3)}),
        "the model's is torch.float32 \\(3,\\)": write("shape", {"embedder.w": torch.ones(2, 3), "embedder.b": torch.ones(4)}),
        "float64": write("dtype", {"embedder.w": torch.ones(2, 3, dtype=torch.float64), "embedder.b": torch.ones(3)}),
        "non-finite": write("nan", {"embedder.w": torch.full((2, 3), float("nan")), "embedder.b": torch.ones(3)}),
    }
    (tmp_path / "junk").write_bytes(b"\x00" * 20)
    for message, path in cases.items():
        with pytest.raises(PretrainedError, match=message):
            load_pretrained(path, like)
