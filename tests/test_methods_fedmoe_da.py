import math

import pytest
import torch
from torch import nn

from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.expert_selection import correlation, fetch_set, selection_weights
from p2pmoe.methods.fedmoe_da import FedMoEDANode, FedMoEDAServer, make_plan
from p2pmoe.methods.local import LocalMethod
from p2pmoe.models import MoEClassifier
from p2pmoe.models.params import float_state
from p2pmoe.sim.bus import SimNetwork
from p2pmoe.wire.codec import ProtocolError
from p2pmoe.wire.messages import Message, MessageKind

OWN = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
GATES = {"A": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "B": torch.tensor([[0.0, 1.0], [-1.0, 0.0]])}
SOURCES = [("me", 0), ("me", 1), ("A", 0), ("A", 1), ("B", 0), ("B", 1)]


def test_hand_worked_correlation():
    r = correlation(OWN, torch.cat([OWN, GATES["A"], GATES["B"]]))
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, 1, s, 0, -1], [0, 1, 0, s, 1, 0]], dtype=torch.float64)
    assert torch.allclose(r, expected)


def test_hand_worked_selection_and_weights():
    plan = make_plan("me", OWN.double(), {k: v.double() for k, v in GATES.items()}, p=2, tau=1.0)
    assert plan.sources == SOURCES
    e, es = math.e, math.exp(1 / math.sqrt(2))
    total = 2 * e + es
    expected = torch.tensor([[e / total, 0, e / total, es / total, 0, 0], [0, e / total, 0, es / total, e / total, 0]], dtype=torch.float64)
    assert torch.allclose(plan.weights, expected)
    assert fetch_set(plan.weights, plan.sources, "me") == {"A": [0, 1], "B": [0]}


def test_ties_at_the_threshold_are_all_kept():
    r = correlation(OWN, torch.cat([OWN, GATES["A"], GATES["B"]]))
    # P = 1: the two largest of row 0 are both 1 (itself and A0), nothing else.
    w1 = selection_weights(r, p=1, tau=1.0)
    assert torch.allclose(w1[0], torch.tensor([0.5, 0, 0.5, 0, 0, 0], dtype=torch.float64))
    # P = 3: the 4th largest of row 0 is 0, shared by three entries: all five entries >= 0 stay.
    w3 = selection_weights(r, p=3, tau=1.0)
    assert (w3[0] > 0).tolist() == [True, True, True, True, True, False]
    assert torch.allclose(w3.sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_temperature_sharpens_and_p0_keeps_only_itself():
    r = correlation(OWN, torch.cat([OWN, GATES["A"], GATES["B"]]))
    assert torch.equal(selection_weights(r, p=0, tau=1.0), torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]], dtype=torch.float64))
    soft, sharp = selection_weights(r, 2, 10.0), selection_weights(r, 2, 0.1)
    assert sharp[0, 3] < soft[0, 3]


def test_unavailable_candidates_are_renormalised_away():
    r = correlation(OWN, torch.cat([OWN, GATES["A"], GATES["B"]]))
    available = torch.tensor([True, True, False, False, True, True])
    w = selection_weights(r, p=1, tau=1.0, available=available)
    assert w[:, 2:4].sum() == 0 and torch.allclose(w.sum(dim=1), torch.ones(2, dtype=torch.float64))


def _learner(seed: int) -> ImageClassifierLearner:
    torch.manual_seed(0)  # identical initial weights on every node
    model = MoEClassifier(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), 8, 3, 8, 2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, seed % 4] > 0).long()
    return ImageClassifierLearner(model, (x, y), (x[:16], y[:16]), batch_size=16, lr=0.1, seed=seed)


def _swarm(p: int, embedding: str = "frozen", planner: str = "p2p", interval: int = 1):
    ids = ["n0", "n1", "n2", "n3"]
    learners = {n: _learner(i) for i, n in enumerate(ids)}
    server = "server" if planner == "server" or embedding == "server" else None
    nodes = {
        n: FedMoEDANode(
            n,
            learners[n],
            [m for m in ids if m != n],
            [ids[(i - 1) % 4], ids[(i + 1) % 4]],
            p=p,
            tau=1.0,
            interval=interval,
            embedding=embedding,
            server_id=server,
            planner=planner,
        )
        for i, n in enumerate(ids)
    }
    if server:
        template = float_state(learners["n0"].model, "embedder.") if embedding == "server" else None
        gate = learners["n0"].model.moe.gating_matrix() if planner == "server" else None
        nodes[server] = FedMoEDAServer(server, ids, template, p=p, tau=1.0, plans=planner == "server", interval=interval, gate_template=gate)
    return nodes, learners


def test_p0_equals_local_training():
    nodes, learners = _swarm(p=0)
    locals_ = {n: LocalMethod(n, _learner(i)) for i, n in enumerate(["n0", "n1", "n2", "n3"])}
    ledger = ByteLedger()
    for r in range(2):
        SimNetwork(nodes, ledger).run_round(r)
        SimNetwork(locals_).run_round(r)
    for n in locals_:
        a, b = float_state(learners[n].model), float_state(locals_[n].learner.model)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ledger.entries == []  # P = 0 aggregates nothing, so not even a gate is published


def test_fetches_exactly_the_selected_pairs_once_and_aggregates_them():
    nodes, learners = _swarm(p=2)
    ledger = ByteLedger()
    bus = SimNetwork(nodes, ledger)

    bus.run_round(0)
    for node_id, node in nodes.items():
        expected = fetch_set(node.plan.weights, node.plan.sources, node_id)
        asked = {e.dst for e in ledger.entries if e.src == node_id and e.kind == "expert_request"}
        assert asked == set(expected)
        answers = [e for e in ledger.entries if e.dst == node_id and e.kind == "expert_response"]
        assert len(answers) == len(expected)  # one response per peer, each slot once
        expert_bytes = sum(v.numel() * 4 for v in learners[node_id].model.moe.expert_state(0).values())
        for e in answers:
            assert e.payload_bytes == expert_bytes * len(expected[e.src])
    # the aggregate of slot 0 equals the plan's weighted sum of the snapshots it fetched
    node = nodes["n1"]
    assert node.round_complete()


def test_aggregation_is_the_weighted_sum_of_selected_experts():
    nodes, learners = _swarm(p=3)
    snap = {}
    for n, node in nodes.items():
        node.train_local(0)
        snap[n] = {s: learners[n].model.moe.expert_state(s) for s in range(3)}
    bus = SimNetwork(nodes)
    for node in nodes.values():
        node.train_local = lambda r: {}  # already trained: keep the snapshot comparable
    bus.run_round(0)
    plan = nodes["n2"].plan
    for slot in range(3):
        got = learners["n2"].model.moe.expert_state(slot)
        for name, tensor in got.items():
            want = sum(plan.weights[slot, c].item() * snap[src][s][name] for c, (src, s) in enumerate(plan.sources))
            assert torch.allclose(tensor, want.float(), atol=1e-5)


def test_server_assisted_plans_match_the_peer_to_peer_ones():
    p2p, _ = _swarm(p=2)
    srv, _ = _swarm(p=2, planner="server")
    SimNetwork(p2p).run_round(0)
    ledger = ByteLedger()
    SimNetwork(srv, ledger).run_round(0)
    for n in ("n0", "n1", "n2", "n3"):
        assert p2p[n].plan.sources == srv[n].plan.sources
        assert torch.allclose(p2p[n].plan.weights, srv[n].plan.weights, atol=1e-6)
    assert {e.kind for e in ledger.entries if e.dst == "server"} == {"gate_publish"}


def test_gossip_and_server_embedding_modes_complete_and_mix_phi():
    for embedding in ("gossip", "server"):
        nodes, learners = _swarm(p=1, embedding=embedding)
        ledger = ByteLedger()
        SimNetwork(nodes, ledger).run_round(0)
        kinds = {e.kind for e in ledger.entries}
        assert ("embedding" in kinds) == (embedding == "gossip")
        assert ("model_update" in kinds) == (embedding == "server")
        if embedding == "server":  # FedAvg of φ: every node holds the same embedder
            a, b = float_state(learners["n0"].model, "embedder."), float_state(learners["n3"].model, "embedder.")
            assert all(torch.allclose(a[k], b[k]) for k in a)


def test_interval_reuses_the_plan_without_gate_traffic():
    nodes, _ = _swarm(p=1, interval=2)
    ledger = ByteLedger()
    bus = SimNetwork(nodes, ledger)
    for r in range(3):
        bus.run_round(r)
    gate_rounds = sorted({e.round for e in ledger.entries if e.kind == "gate_publish"})
    expert_rounds = sorted({e.round for e in ledger.entries if e.kind == "expert_request"})
    assert gate_rounds == [0, 2] and expert_rounds == [0, 1, 2]


def test_bad_peer_input_is_refused_and_changes_nothing():
    nodes, learners = _swarm(p=2)
    node = nodes["n0"]
    node.start_round(0)
    before = float_state(learners["n0"].model)
    with pytest.raises(ProtocolError, match="slots"):
        node.on_message("n1", Message(MessageKind.EXPERT_REQUEST, 0, meta={"req": 1, "slots": [7]}))
    with pytest.raises(ProtocolError, match="shape"):
        node.on_message("n1", Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.zeros(2, 8)}))
    with pytest.raises(ProtocolError, match="no experts expected"):
        node.on_message("n1", Message(MessageKind.EXPERT_RESPONSE, 0, {}))
    with pytest.raises(ProtocolError, match="round"):
        node.on_message("n1", Message(MessageKind.GATE_PUBLISH, 5, {"gate": torch.zeros(3, 8)}))
    after = float_state(learners["n0"].model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lost_peer_does_not_stall_the_round():
    nodes, _ = _swarm(p=2)
    del nodes["n3"]
    for node in nodes.values():
        node.on_peer_lost("n3")
    SimNetwork(nodes).run_round(0)
    assert all(node.round_complete() for node in nodes.values())
    assert all(src != "n3" for node in nodes.values() for src, _ in node.plan.sources)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("topology", ["ring", "random-regular:3"])
def test_partial_participation_fetches_only_from_sampled_topology_neighbours(tmp_path, topology):
    """With hops = 1 and participation 0.5, every gate, phi and expert exchange of a round is
    between two sampled nodes that are topology neighbours, and nothing is refused."""
    from pathlib import Path

    from p2pmoe.config import default_config
    from p2pmoe.data.images import FMNIST_ROOT
    from p2pmoe.experiment import resolve_experiment
    from p2pmoe.participation import Participation
    from p2pmoe.runs import read_ledger
    from p2pmoe.sim.runner import run_simulation

    if not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (make data)")
    cfg = default_config(method="fedmoe-da", data="fmnist", nodes=8, rounds=4, topology=topology, hops=1, participation=0.5, train="none", out=str(tmp_path))
    run_simulation(cfg, progress=False, report=False)
    graph = resolve_experiment(cfg).graph
    part = Participation(cfg.run.seed, 0.5, sorted(graph.nodes), mode="availability")  # peer-to-peer: churn, not sampling
    ledger = read_ledger(tmp_path / "ledger.csv")
    assert {e.kind for e in ledger} >= {"gate_publish", "expert_request", "expert_response", "embedding"} and "error" not in {e.kind for e in ledger}
    for e in ledger:
        assert graph.has_edge(e.src, e.dst), f"{e.kind} between {e.src} and {e.dst}, not neighbours on {topology}"
        assert e.src in part.sampled(e.round) and e.dst in part.sampled(e.round), f"{e.kind} in round {e.round} with an unsampled node"


def test_fedrep_averages_phi_on_a_server_and_keeps_gate_and_experts_home(tmp_path):
    """Real data: only phi travels (model_update / model_global, no gate or expert message);
    after a round every client holds the same phi and its own gate and experts."""
    from pathlib import Path

    from p2pmoe.config import default_config
    from p2pmoe.data.images import FMNIST_ROOT
    from p2pmoe.experiment import build_experiment, resolve_experiment
    from p2pmoe.ledger import ByteLedger
    from p2pmoe.sim.bus import SimNetwork

    if not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (make data)")
    cfg = default_config(method="fedrep", data="fmnist", nodes=3, rounds=1, max_train_per_node=100, threads=1, out=str(tmp_path))
    experiment = build_experiment(resolve_experiment(cfg))
    ledger = ByteLedger()
    SimNetwork(experiment.nodes, ledger).run_round(0)
    assert {e.kind for e in ledger.entries} == {"model_update", "model_global"}
    models = [experiment.nodes[c].learner.model for c in experiment.clients]
    phis = [torch.cat([p.flatten() for p in m.embedder.parameters()]) for m in models]
    moes = [torch.cat([p.flatten() for p in m.moe.parameters()]) for m in models]
    assert all(torch.equal(phis[0], phi) for phi in phis[1:])
    assert not any(torch.equal(moes[0], moe) for moe in moes[1:])


def test_p_zero_publishes_no_gate():
    from p2pmoe.methods.fedmoe_da import FedMoEDANode

    node = FedMoEDANode("a", _learner(0), visible=["b", "c"], neighbours=[], p=0, embedding="frozen")
    assert node.start_round(0) == [] and node.round_complete()


def _validated_pair(peer_scale: float):
    """Two nodes with frozen phi; node b's experts are node a's times `peer_scale` (1: the very
    same experts); a vets them on its own held-out examples."""
    learners = {"a": _learner(0), "b": _learner(0)}
    for slot in range(3):
        own = learners["a"].model.moe.expert_state(slot)
        learners["b"].model.moe.load_expert_state(slot, {k: v * peer_scale for k, v in own.items()})
    validation = learners["a"].hold_out(16, seed=1)
    nodes = {
        "a": FedMoEDANode("a", learners["a"], ["b"], [], p=1, embedding="frozen", validation=validation),
        "b": FedMoEDANode("b", learners["b"], ["a"], [], p=1, embedding="frozen"),
    }
    for node in nodes.values():
        node.local_epochs = 0  # no training: the experts stay as set, so the test knows the losses
    return nodes, learners


def test_validated_aggregation_drops_a_peer_expert_that_is_worse_on_own_data_and_keeps_an_equal_one():
    nodes, learners = _validated_pair(peer_scale=-40.0)  # flipped, huge logits: far worse on a's data
    before = {slot: learners["a"].model.moe.expert_state(slot) for slot in range(3)}
    SimNetwork(nodes).run_round(0)
    assert nodes["a"].diagnostics()["dropped_by_validation"] == 3  # P = 1 peer column per slot, all vetoed
    after = {slot: learners["a"].model.moe.expert_state(slot) for slot in range(3)}
    assert all(torch.equal(before[s][k], after[s][k]) for s in before for k in before[s])

    nodes, learners = _validated_pair(peer_scale=1.0)  # the same experts: no worse, so blended in
    SimNetwork(nodes).run_round(0)
    assert nodes["a"].diagnostics()["dropped_by_validation"] == 0


def test_hold_out_removes_examples_from_training_for_good():
    learner = _learner(0)
    x, y = learner.hold_out(10, seed=3)
    assert learner.num_train_examples == 54 and len(learner.train_y) == 54 and x.shape == (10, 4) and y.shape == (10,)
    with pytest.raises(ValueError, match="at least one must stay"):
        learner.hold_out(54, seed=3)


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
@pytest.mark.parametrize("value", [3e38, -3e38, 65504.0, -65504.0])
def test_finite_but_huge_values_from_a_peer_are_refused_and_change_nothing(value, compression):
    """Issue 26 N1: values that pass the finiteness check but dwarf the model's own scale, in
    phi, gates and expert replies, sent through the wire under each compression mode (fp16
    sends 3e38 as float32, int8 restores it through its scale), are refused with an error
    naming the tensor, and the node's model is untouched."""
    from p2pmoe.driver.runner import NodeRunner
    from p2pmoe.methods.fedmoe_da import expert_tensors
    from p2pmoe.wire.codec import decode, encode
    from p2pmoe.wire.compression import parse_compression

    def wire(message: Message) -> Message:
        return decode(encode("n1", message, compression=parse_compression(compression))).message

    nodes, learners = _swarm(p=1, embedding="gossip")
    a = NodeRunner("n0", nodes["n0"])
    before = {k: v.clone() for k, v in float_state(learners["n0"].model).items()}
    a.round = 0
    a.start(0)
    own_phi = float_state(learners["n0"].model, "embedder.")
    gate = learners["n0"].model.moe.gating_matrix().detach().float()
    for message in (
        Message(MessageKind.EMBEDDING, 0, {k: torch.full_like(v, value) for k, v in own_phi.items()}, {"degree": 2}),
        Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.full_like(gate, value)}),
    ):
        replies = a.deliver("n1", wire(message))
        assert replies[0].message.kind is MessageKind.ERROR and "exceeds" in replies[0].message.meta["reason"]
    requests = []
    for peer in ("n2", "n3"):  # honest gates: n0 plans over n2 and n3 and asks them for experts
        requests += a.deliver(peer, Message(MessageKind.GATE_PUBLISH, 0, {"gate": learners[peer].model.moe.gating_matrix().detach().float()}))
    request = next(s for s in requests if s.message.kind is MessageKind.EXPERT_REQUEST)
    slots = request.message.meta["slots"]
    poisoned = {k: torch.full_like(v, value) for k, v in expert_tensors({s: nodes["n0"]._snapshot[s] for s in slots}).items()}
    reply = Message(MessageKind.EXPERT_RESPONSE, 0, poisoned, {"req": request.message.meta["req"]})
    replies = a.deliver(request.dst, decode(encode(request.dst, reply, compression=parse_compression(compression))).message)
    assert replies[0].message.kind is MessageKind.ERROR and "exceeds" in replies[0].message.meta["reason"]
    a.deadline(0)  # the round ends without the poisoned experts
    after = float_state(learners["n0"].model)
    experts = [k for k in after if ".experts." in k or k.startswith("moe.experts")]
    assert experts and all(float(after[k].abs().max()) < 1e3 for k in after)  # no poisoned value anywhere in the model
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("moe.experts"))


def test_a_merge_that_makes_training_explode_is_rolled_back():
    """Issue 26 N1: whatever passes the bounds, a loss that is not a number (or explodes) after a
    merge rolls the node back to its state before the merge, and training goes on from there."""
    node = LocalMethod("n0", _learner(0))
    node.train_local(0)
    kept = {k: v.clone() for k, v in float_state(node.learner.model).items()}
    with torch.no_grad():  # a poisoned merge, as if a peer's values had passed every check
        for p in node.learner.model.embedder.parameters():
            p.fill_(1e30)
    stats = node.train_local(1)
    assert stats["rolled_back"] == 1.0 and math.isfinite(stats["train_loss"])
    assert all(torch.isfinite(v).all() for v in float_state(node.learner.model).values())
    assert not any(torch.equal(kept[k], v) for k, v in float_state(node.learner.model).items() if k.startswith("moe.experts"))  # trained on
    assert "rolled_back" not in node.train_local(2)


def test_the_planning_server_checks_gates_against_the_model_not_the_first_sender():
    """Issue 26 N6: a first gate of another shape is refused and does not lock out honest gates."""
    nodes, learners = _swarm(p=1, planner="server")
    server = nodes["server"]
    server.start_round(0)
    honest = learners["n0"].model.moe.gating_matrix().detach().float()
    for bad in (torch.zeros(1, 1), torch.zeros(64, 64)):
        with pytest.raises(ProtocolError):
            server.on_message("n1", Message(MessageKind.GATE_PUBLISH, 0, {"gate": bad}))
    for n in ("n0", "n1", "n2"):
        assert server.on_message(n, Message(MessageKind.GATE_PUBLISH, 0, {"gate": honest})) == []
    assert len(server.on_message("n3", Message(MessageKind.GATE_PUBLISH, 0, {"gate": honest}))) == 4  # every plan goes out


def test_the_planning_server_plans_without_a_node_whose_gate_was_refused():
    """Review finding: a refused gate ends the server's wait for it, as on a peer-to-peer node."""
    nodes, learners = _swarm(p=1, planner="server")
    server = nodes["server"]
    server.start_round(0)
    honest = learners["n0"].model.moe.gating_matrix().detach().float()
    for n in ("n0", "n1", "n2"):
        assert server.on_message(n, Message(MessageKind.GATE_PUBLISH, 0, {"gate": honest})) == []
    bad = Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.full_like(honest, 3e38)})
    with pytest.raises(ProtocolError):
        server.on_message("n3", bad)
    plans = server.on_refused("n3", bad)
    assert sorted(s.dst for s in plans) == ["n0", "n1", "n2"] and server.round_complete()


def test_fine_tuning_before_evaluation_is_an_option_that_reaches_every_node(tmp_path):
    from pathlib import Path

    from p2pmoe.config import default_config, with_options
    from p2pmoe.data.images import FMNIST_ROOT
    from p2pmoe.experiment import build_experiment, resolve_experiment

    if not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (make data)")
    cfg = with_options(
        default_config(method="fedmoe-da", data="fmnist", nodes=2, max_train_per_node=50, out=str(tmp_path)), method_options={"finetune_epochs": 2}
    )
    assert {n.finetune_epochs for n in build_experiment(resolve_experiment(cfg)).nodes.values()} == {2}
    with pytest.raises(ValueError, match="finetune_epochs"):
        with_options(cfg, method_options={"finetune_epochs": -1})


def test_warmup_rounds_mix_phi_every_round_and_exchange_experts_only_after(tmp_path):
    """Issue 25 item 6: in the first W rounds no gate or expert travels and φ is gossiped
    every round; from round W on, selection and the every-second-round φ schedule run."""
    from pathlib import Path

    from p2pmoe.config import default_config, with_options
    from p2pmoe.data.images import FMNIST_ROOT
    from p2pmoe.runs import read_ledger
    from p2pmoe.sim.runner import run_simulation

    if not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (make data)")
    cfg = default_config(method="fedmoe-da", data="fmnist", nodes=4, rounds=6, train="none", out=str(tmp_path))
    run_simulation(with_options(cfg, method_options={"warmup_rounds": 3}), progress=False, report=False)
    kinds: dict[int, set[str]] = {}
    for e in read_ledger(tmp_path / "ledger.csv"):
        kinds.setdefault(e.round, set()).add(e.kind)
    assert [kinds.get(r, set()) for r in range(3)] == [{"embedding"}] * 3  # φ every round, nothing else
    assert {"gate_publish", "expert_request", "expert_response"} <= kinds[3] and "embedding" not in kinds[3]  # 3 is odd: no φ
    assert "embedding" in kinds[4] and "embedding" not in kinds[5]


def test_a_node_with_few_examples_holds_out_at_most_a_fifth_of_them():
    """Issue 25 (b): under Dirichlet 0.3 over 100 nodes some hold under 100 images; asking each
    for 120 validation examples must not stop the run, nor take most of a small node's data."""
    import networkx as nx

    from p2pmoe.config import default_config, with_options
    from p2pmoe.methods.registry import get_method
    from p2pmoe.tasks.base import task_for_data

    cfg = with_options(default_config(method="fedmoe-da", data="fmnist", nodes=2), method_options={"validation_examples": 120})
    learners = {"node-00": _learner(0), "node-01": _learner(1)}
    learners["node-01"].hold_out(60, seed=0)  # node-01 keeps 4 examples: a fifth of them is 0
    ctx = get_method("fedmoe-da").context(cfg, task_for_data("fmnist"), list(learners), nx.path_graph(list(learners)), set(learners))
    ctx._learners.update(learners)
    big, small = (get_method("fedmoe-da").build_client(ctx, node) for node in learners)
    assert big.validation is not None and len(big.validation[1]) == 12 and learners["node-00"].num_train_examples == 52
    assert small.validation is None and learners["node-01"].num_train_examples == 4


def _attacked(attack: str, p: int = 1, **defence):
    """Two rounds of the 4-node swarm with n3 lying; per round, how many of the honest nodes'
    12 slots give n3's experts a weight."""
    from p2pmoe.methods.attacks import Adversary, parse_attack

    nodes, learners = _swarm(p=p)
    for n in ("n0", "n1", "n2"):
        for name, value in defence.items():
            setattr(nodes[n], name, value)
    adversary = {"n3": Adversary("n3", parse_attack(attack), 0)}
    seen = []
    for r in range(2):
        SimNetwork(nodes, adversaries=adversary).run_round(r)
        picks = 0
        for n in ("n0", "n1", "n2"):
            plan = nodes[n].plan
            columns = [c for c, (node, _) in enumerate(plan.sources) if node == "n3"]
            weight = plan.weights[:, columns].sum(dim=1)
            picks += int((weight > 0).sum())
        seen.append(picks)
    return seen, nodes, learners


def test_gate_mimicry_gets_the_attacker_selected_and_the_cap_bounds_its_share():
    """Issue 30: publishing the neighbours' mean gate makes honest nodes pick the attacker's
    experts (shown first), and `source_cap` bounds what one source can weigh in a slot."""
    plain, _, _ = _attacked("sign-flip:5")
    mimic, _, _ = _attacked("mimic-mean+sign-flip:5")
    assert plain == [0, 0] and min(mimic) >= 6  # of the honest nodes' 12 slots
    from p2pmoe.methods.robust import cap_source_share

    weights = torch.tensor([[0.2, 0.0, 0.8, 0.0], [0.0, 0.4, 0.3, 0.3]])  # own e0, own e1, peer (x, 0), peer (x, 1)
    capped = cap_source_share(weights, [("me", 0), ("me", 1), ("x", 0), ("x", 1)], "me", 0.25)
    assert capped.flatten().tolist() == pytest.approx([0.75, 0.0, 0.25, 0.0, 0.0, 0.75, 0.125, 0.125])
    assert capped.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_a_slot_median_keeps_a_poisoned_expert_out_of_an_honest_slot():
    _, _, learners = _attacked("mimic-mean+sign-flip:50", p=2)
    _, _, guarded = _attacked("mimic-mean+sign-flip:50", p=2, slot_rule="median")
    honest_scale = max(float(t.abs().max()) for n in ("n0", "n1", "n2") for t in float_state(guarded[n].model.moe).values())
    poisoned_scale = max(float(t.abs().max()) for n in ("n0", "n1", "n2") for t in float_state(learners[n].model.moe).values())
    assert poisoned_scale > 3 * honest_scale  # the mean let the -50x expert in; the median of three kept the honest values


def test_clipped_phi_gossip_bounds_what_a_sign_flipping_partner_does_to_honest_phi():
    """Issue 30: a liar's φ (own φ x -50, every round) reaches its ring neighbours n0 and n2 by
    gossip; with `phi_clip` each partner's difference is clipped to norm 1 before mixing
    (ClippedGossip), so honest φ moves by at most its weight x 1 instead of taking on the lie."""
    from p2pmoe.methods.attacks import Adversary, parse_attack
    from p2pmoe.methods.fedmoe_da import FedMoEDAOptions

    def honest_phi_scale(clip: float | None) -> float:
        nodes, learners = _swarm(p=1, embedding="gossip")
        for n in ("n0", "n1", "n2"):
            nodes[n].gossip.clip = clip
        SimNetwork(nodes, adversaries={"n3": Adversary("n3", parse_attack("sign-flip:50"), 0)}).run_round(0)
        return max(float(t.abs().max()) for n in ("n0", "n2") for t in float_state(learners[n].model, "embedder.").values())

    plain, clipped = honest_phi_scale(None), honest_phi_scale(1.0)
    assert plain > 5 * clipped and clipped < 2.0  # the mean took on a third of -50x; the clipped mix stayed at the honest scale
    assert FedMoEDAOptions(phi_clip=1.0).phi_clip == 1.0
    with pytest.raises(ValueError, match="phi_clip"):
        FedMoEDAOptions(phi_clip=1.0, embedding="frozen")


def test_a_refused_gate_or_phi_ends_the_wait_for_that_peer_this_round():
    """Issue 26 N1 (found measuring it): a liar whose gate and φ every honest node refuses
    must not hold their rounds to the deadline. The refusal ends the wait for that peer: the
    node plans, fetches and mixes over the others, and the round completes without a deadline."""
    from p2pmoe.driver.runner import NodeRunner

    nodes, learners = _swarm(p=1, embedding="gossip")
    runner = NodeRunner("n0", nodes["n0"])
    runner.round = 0
    sends = runner.start(0)
    awaited = set(nodes["n0"]._gates_awaited)
    assert awaited == {"n1", "n2", "n3"} and not nodes["n0"].gossip.done
    gate = learners["n0"].model.moe.gating_matrix().detach().float()
    phi = float_state(learners["n0"].model, "embedder.")
    for peer in ("n1", "n2"):  # honest gates
        runner.deliver(peer, Message(MessageKind.GATE_PUBLISH, 0, {"gate": learners[peer].model.moe.gating_matrix().detach().float()}))
    replies = runner.deliver("n3", Message(MessageKind.GATE_PUBLISH, 0, {"gate": torch.full_like(gate, 3e38)}))
    assert replies[0].message.kind is MessageKind.ERROR and replies[0].dst == "n3"
    requests = [s for s in replies[1:] if s.message.kind is MessageKind.EXPERT_REQUEST]
    assert not nodes["n0"]._gates_awaited and nodes["n0"].plan is not None  # planned over n0, n1, n2 at once
    assert {s.dst for s in requests} <= {"n1", "n2"}
    partners = {s.dst for s in sends if s.message.kind is MessageKind.EMBEDDING}
    for peer in sorted(partners):
        runner.deliver(peer, Message(MessageKind.EMBEDDING, 0, {k: torch.full_like(v, 3e38) for k, v in phi.items()}, {"degree": 2}))
    assert nodes["n0"].gossip.done  # every partner's φ refused: mixed with none of them, no waiting


def test_a_refused_gossip_message_ends_the_wait_for_that_neighbour():
    from p2pmoe.methods.gossip import GossipNode

    node = GossipNode("a", _learner(0), ["b", "c"])
    node.start_round(0)
    assert not node.round_complete()
    bad = Message(MessageKind.GOSSIP, 0, {k: torch.full_like(v, 3e38) for k, v in float_state(node.learner.model).items()}, {"degree": 2})
    with pytest.raises(ProtocolError):
        node.on_message("b", bad)
    node.on_refused("b", bad)
    node.on_refused("c", Message(MessageKind.GOSSIP, 5, {}, {"degree": 2}))  # another round's refusal changes nothing
    assert not node.round_complete()
    node.on_refused("c", bad)
    assert node.round_complete()


def test_no_aggregation_before_this_rounds_plan_when_a_peer_drops_out_early():
    """Found by the swarm attack test: a peer lost (or refused) while other gates of the round
    were still awaited made the node mix at once with the plan kept from the round before,
    and this round's plan then found the round aggregated: the node learnt nothing from it."""
    nodes, learners = _swarm(p=1)
    node = nodes["n0"]
    node.start_round(0)
    node.on_deadline(0)  # round 0 ends with a plan over its own experts
    assert node.plan is not None and node._aggregated
    node.start_round(1)
    node.on_peer_lost("n3")
    assert node._gates_awaited == {"n1", "n2"} and not node._aggregated


def test_a_late_reply_after_the_deadline_is_refused_and_a_new_round_starts_with_nothing_fetched():
    """Review finding: with the reset of fetched experts lost from `_enter`, a reply that came
    after round 0's deadline stayed in `_fetched` and was mixed into round 1 as if it were that
    round's. Now the deadline ends the wait and every round starts with nothing fetched."""
    from p2pmoe.methods.fedmoe_da import expert_tensors

    nodes, learners = _swarm(p=2)
    n0 = nodes["n0"]
    sends = n0.start_round(0)
    for peer in ("n1", "n2", "n3"):
        sends += n0.on_message(peer, Message(MessageKind.GATE_PUBLISH, 0, {"gate": learners[peer].model.moe.gating_matrix().detach().float()}))
    request = next(s for s in sends if s.message.kind is MessageKind.EXPERT_REQUEST)
    n0.on_deadline(0)
    slots = request.message.meta["slots"]
    late = expert_tensors({s: learners[request.dst].model.moe.expert_state(s) for s in slots})
    with pytest.raises(ProtocolError, match="no experts expected"):
        n0.on_message(request.dst, Message(MessageKind.EXPERT_RESPONSE, 0, late, {"req": request.message.meta["req"]}))
    n0._fetched[("n1", 0)] = {}  # whatever a round left behind ...
    n0.start_round(1)
    assert n0._fetched == {} and n0._fetch_awaited == {}  # ... the next one starts without it
