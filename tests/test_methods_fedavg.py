import pytest
import torch
from torch import nn

from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.fedavg import FedAvgClient, FedAvgServer
from p2pmoe.methods.gossip import GossipNode
from p2pmoe.methods.local import LocalMethod
from p2pmoe.models.params import float_state, weighted_average
from p2pmoe.participation import Participation
from p2pmoe.sim.bus import SimNetwork
from p2pmoe.wire.codec import ProtocolError, encode, frame_sizes
from p2pmoe.wire.messages import Message, MessageKind


class ConstantLearner:
    """A learner whose 'training' sets its weight to a fixed value: averages are then exact."""

    def __init__(self, value: float, examples: int) -> None:
        self.model = nn.Linear(3, 2)
        self.value = value
        self.num_train_examples = examples

    def train(self, epochs: int) -> dict[str, float]:
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(self.value)
        return {"train_loss": self.value}

    def evaluate(self) -> dict[str, float]:
        return {"accuracy": float(self.model.weight.detach().mean())}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return float_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def _fedavg(values, counts, fraction=1.0):
    learners = [ConstantLearner(v, n) for v, n in zip(values, counts, strict=True)]
    ids = [f"c{i}" for i in range(len(learners))]
    part = Participation(seed=0, fraction=fraction, clients=ids)
    nodes = {"server": FedAvgServer("server", ids, float_state(learners[0].model), part)}
    nodes.update({i: FedAvgClient(i, lrn, "server", participation=part) for i, lrn in zip(ids, learners, strict=True)})
    return nodes, learners, ids


def test_fedavg_gives_every_client_the_example_weighted_mean():
    nodes, learners, _ = _fedavg([1.0, 4.0], [1, 2])
    SimNetwork(nodes).run_round(0)
    for learner in learners:
        assert torch.allclose(learner.model.weight, torch.full((2, 3), 3.0))


def test_fedavg_ledger_counts_one_upload_and_one_download_per_client():
    nodes, learners, ids = _fedavg([1.0, 2.0, 3.0], [1, 1, 1])
    ledger = ByteLedger()
    SimNetwork(nodes, ledger).run_round(0)
    kinds = [(e.src, e.dst, e.kind) for e in ledger.entries]
    assert sorted(kinds) == sorted([(c, "server", "model_update") for c in ids] + [("server", c, "model_global") for c in ids])
    update = encode("c0", Message(MessageKind.MODEL_UPDATE, 0, float_state(learners[0].model), {"num_examples": 1}))
    assert ledger.entries[0].total == sum(frame_sizes(update))
    assert ledger.entries[0].payload_bytes == 4 * (2 * 3 + 2)
    per_client = ledger.per_node_per_round(ids, 1)["total"]
    assert per_client == pytest.approx(sum(e.total for e in ledger.entries) / 3)


def test_server_finishes_the_round_without_a_lost_client():
    nodes, learners, ids = _fedavg([1.0, 5.0, 9.0], [1, 1, 1])
    server = nodes["server"]
    server.start_round(0)
    sends = server.on_message("c0", nodes["c0"].start_round(0)[0].message)
    sends += server.on_message("c1", nodes["c1"].start_round(0)[0].message)
    assert sends == [] and not server.round_complete()
    sends = server.on_peer_lost("c2")
    assert server.round_complete()
    assert sorted(s.dst for s in sends) == ["c0", "c1"]


def test_server_on_deadline_averages_what_arrived():
    nodes, learners, ids = _fedavg([2.0, 8.0], [1, 1])
    for learner in learners:
        learner.train(1)
    server = nodes["server"]
    server.start_round(0)
    server.on_message("c0", nodes["c0"].start_round(0)[0].message)
    sends = server.on_deadline(0)
    assert {s.dst for s in sends} == {"c0", "c1"}
    assert torch.allclose(sends[0].message.tensors["weight"], torch.full((2, 3), 2.0))


def test_server_rejects_bad_updates_and_keeps_its_state():
    nodes, learners, _ = _fedavg([1.0, 1.0], [1, 1])
    server = nodes["server"]
    before = {k: v.clone() for k, v in server.state_dict().items()}
    server.start_round(0)
    wrong_shape = Message(MessageKind.MODEL_UPDATE, 0, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, {"num_examples": 1})
    with pytest.raises(ProtocolError, match="shape"):
        server.on_message("c0", wrong_shape)
    good = nodes["c0"].start_round(0)[0].message
    with pytest.raises(ProtocolError, match="not a client"):
        server.on_message("mallory", good)
    with pytest.raises(ProtocolError, match="round"):
        server.on_message("c0", Message(MessageKind.MODEL_UPDATE, 5, good.tensors, good.meta))
    with pytest.raises(ProtocolError, match="num_examples"):
        server.on_message("c0", Message(MessageKind.MODEL_UPDATE, 0, good.tensors, {"num_examples": -3}))
    assert all(torch.equal(before[k], v) for k, v in server.state_dict().items())


def test_client_ignores_nothing_silently():
    nodes, _, _ = _fedavg([1.0], [1])
    client = nodes["c0"]
    client.start_round(0)
    with pytest.raises(ProtocolError, match="unexpected"):
        client.on_message("c9", Message(MessageKind.MODEL_GLOBAL, 0, {}))


def test_local_sends_nothing_and_completes_at_once():
    node = LocalMethod("a", ConstantLearner(2.0, 1))
    ledger = ByteLedger()
    stats = SimNetwork({"a": node}, ledger).run_round(0)
    assert stats == {"a": {"train_loss": 2.0, "sample_epochs": 1.0}} and ledger.entries == []


def test_weighted_average_rejects_mismatched_states():
    with pytest.raises(ProtocolError):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(1)}], [0])


def test_server_counts_on_a_rejoined_client_again():
    nodes, learners, ids = _fedavg([1.0, 3.0], [1, 1])
    server = nodes["server"]
    server.on_peer_lost("c1")
    server.on_peer_joined("c1")
    server.on_peer_joined("mallory")
    server.start_round(0)
    assert server.on_message("c0", nodes["c0"].start_round(0)[0].message) == []
    assert len(server.on_message("c1", nodes["c1"].start_round(0)[0].message)) == 2


def test_partial_participation_averages_exactly_the_sampled_clients():
    """FedAvg at scale: only the round's sample uploads, the server averages exactly those
    updates, and the average goes to the clients sampled for the next round (they start it
    from the global model); the others send, receive and train nothing."""
    values, counts = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0], [1, 2, 3, 1, 2, 3]
    nodes, learners, ids = _fedavg(values, counts, fraction=0.5)
    part = nodes["server"].participation
    ledger = ByteLedger()
    network = SimNetwork(nodes, ledger)
    for r in range(4):
        sampled, following = part.sampled(r), part.sampled(r + 1)
        assert len(sampled) == 3
        stats = network.run_round(r)
        assert {n for n, s in stats.items() if s} == sampled  # only the sample trained
        entries = [e for e in ledger.entries if e.round == r]
        assert sorted(e.src for e in entries if e.kind == "model_update") == sorted(sampled)
        assert sorted(e.dst for e in entries if e.kind == "model_global") == sorted(following)
        chosen = [k for k, c in enumerate(ids) if c in sampled]
        mean = sum(values[k] * counts[k] for k in chosen) / sum(counts[k] for k in chosen)
        assert torch.allclose(nodes["server"].global_state["weight"], torch.full((2, 3), mean))
        for k, c in enumerate(ids):
            if c in following:
                assert torch.allclose(learners[k].model.weight, torch.full((2, 3), mean))
    sat_out = {(row["round"], row["node"]) for row in network.rows if row.get("diagnostics", {}).get("sat_out")}
    assert sat_out == {(r, c) for r in range(4) for c in ids if c not in part.sampled(r)}


def test_gossip_mixes_only_sampled_neighbours_and_keeps_the_sum():
    """Partial participation in D-PSGD: a sampled node exchanges only with sampled neighbours;
    the Metropolis-Hastings mixing stays doubly stochastic, so the sum of all models is kept."""
    ids = [f"c{i}" for i in range(6)]
    part = Participation(seed=3, fraction=0.5, clients=ids)
    learners = [ConstantLearner(float(i + 1), 1) for i in range(6)]
    nodes = {c: GossipNode(c, lrn, [ids[(k - 1) % 6], ids[(k + 1) % 6]], participation=part) for k, (c, lrn) in enumerate(zip(ids, learners, strict=True))}
    ledger = ByteLedger()
    network = SimNetwork(nodes, ledger)
    for r in range(3):
        sampled = part.sampled(r)
        before = [lrn.value if c in sampled else lrn.model.weight.detach().clone() for c, lrn in zip(ids, learners, strict=True)]
        network.run_round(r)
        expected = sum(torch.full((2, 3), b) if isinstance(b, float) else b for b in before)
        assert torch.allclose(sum(lrn.model.weight for lrn in learners), expected)
        pairs = {(e.src, e.dst) for e in ledger.entries if e.round == r}
        assert all(src in sampled and dst in sampled and abs(ids.index(src) - ids.index(dst)) in (1, 5) for src, dst in pairs)
    assert any(e.kind == "gossip" for e in ledger.entries) and not any(e.kind == "error" for e in ledger.entries)


def _fmnist_run(tmp_path, method: str, **run):
    from pathlib import Path

    from p2pmoe.config import default_config, with_options
    from p2pmoe.data.images import FMNIST_ROOT
    from p2pmoe.sim.runner import run_simulation

    if not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (make data)")
    cfg = default_config(method=method, data="fmnist", nodes=3, rounds=2, max_train_per_node=120, threads=1, out=str(tmp_path / method), **run)
    return run_simulation(with_options(cfg, task_options={"global_test_size": 200}), progress=False, report=False)


@pytest.mark.slow
def test_fedavg_ft_trains_as_fedavg_and_scores_the_fine_tuned_copy(tmp_path):
    """Real data: the same training losses and bytes in every round as FedAvg (the copy is
    dropped, the shuffling RNG restored), another personalised score, and its compute counted."""
    from p2pmoe.runs import read_metrics

    plain, tuned = _fmnist_run(tmp_path, "fedavg"), _fmnist_run(tmp_path, "fedavg-ft")
    rows = {m: [(r["node"], r["round"], r["train"]) for r in read_metrics(tmp_path / m / "metrics.jsonl")] for m in ("fedavg", "fedavg-ft")}
    assert rows["fedavg"] == rows["fedavg-ft"]
    assert plain["bytes"] == tuned["bytes"]
    assert plain["per_node"] != tuned["per_node"]
    # 3 clients x 120 examples x (2 rounds of training + 2 evaluations x 1 fine-tuning epoch)
    assert plain["compute"]["sample_epochs"] == 3 * 120 * 2 and tuned["compute"]["sample_epochs"] == 3 * 120 * 4


def test_fine_tuned_metrics_leave_the_learner_as_it_was():
    from p2pmoe.learners.vision import ImageClassifierLearner
    from p2pmoe.methods.base import fine_tuned_metrics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    learner = ImageClassifierLearner(model, (x, y), (x[:10], y[:10]), lr=0.5)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    untuned = learner.evaluate()
    metrics = fine_tuned_metrics(learner, 3)
    assert metrics["eval_sample_epochs"] == 120 and metrics["accuracy"] != untuned["accuracy"]
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_client_without_its_server_goes_on_at_once_until_the_server_is_back():
    """A restarted client whose server has finished the run waited out every round deadline
    (2 minutes of a 5-round daemon test); now losing the server ends the wait, as the
    deadline would, and its return makes the client wait for answers again."""
    nodes, _, _ = _fedavg([1.0], [1])
    client = nodes["c0"]
    client.start_round(0)
    assert not client.round_complete()
    client.on_peer_lost("c7")  # someone else: still waiting for the server
    assert not client.round_complete()
    client.on_peer_lost("server")
    assert client.round_complete()
    client.start_round(1)
    assert client.round_complete()  # still no server: nothing to wait for
    client.on_peer_joined("server")
    client.start_round(2)
    assert not client.round_complete()
