"""Sampled-softmax training: the logits are the full table's columns, collisions with the target
are masked, and SASRec and FMoE-CDSR train through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models_fmoe_cdsr import N, batch, domain, model

from p2pmoe.config import default_config, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.learners.sequential import SASRecNextItem, SequenceBatcher
from p2pmoe.models.sampled_softmax import draw_train_negatives, sampled_cross_entropy, sampled_logits
from p2pmoe.tasks.base import task_for_data


def test_sampled_logits_are_the_full_tables_columns_with_and_without_bias():
    torch.manual_seed(0)
    z, weight, bias = torch.randn(6, 4), torch.randn(10, 4), torch.randn(10)
    targets, negatives = torch.tensor([0, 3, 3, 9, 1, 5]), torch.tensor([2, 3, 7])
    full = z @ weight.T + bias
    expected = torch.cat([full.gather(1, targets[:, None]), full[:, negatives]], dim=1)
    torch.testing.assert_close(sampled_logits(z, weight, targets, negatives, bias), expected)
    torch.testing.assert_close(sampled_logits(z, weight, targets, negatives), expected - torch.cat([bias[targets, None], bias[negatives].expand(6, 3)], 1))


def test_every_item_as_negatives_gives_the_full_softmax_loss():
    """The target's own column among the negatives is masked, so nothing is counted twice."""
    torch.manual_seed(1)
    z, weight = torch.randn(8, 4), torch.randn(12, 4)
    targets, everything = torch.randint(12, (8,)), torch.arange(12)
    sampled = sampled_cross_entropy(sampled_logits(z, weight, targets, everything), targets, everything)
    torch.testing.assert_close(sampled, F.cross_entropy(z @ weight.T, targets))


def test_a_negative_equal_to_the_target_does_not_count_against_it():
    logits = torch.tensor([[2.0, 5.0, 0.0]])  # target, then negatives [4, 7]
    loss = sampled_cross_entropy(logits, torch.tensor([4]), torch.tensor([4, 7]))
    torch.testing.assert_close(loss, F.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0])))


def test_drawn_negatives_are_distinct_items_and_bad_counts_are_refused():
    torch.manual_seed(2)
    drawn = draw_train_negatives(50, 20, torch.device("cpu"))
    assert len(set(drawn.tolist())) == 20 and 0 <= int(drawn.min()) and int(drawn.max()) < 50
    for n in (0, 50, 60):
        with pytest.raises(ValueError, match="training negatives"):
            draw_train_negatives(50, n, torch.device("cpu"))


def test_sasrec_trains_only_the_target_and_sampled_item_rows():
    torch.manual_seed(3)
    sasrec = SASRecNextItem(40, 6, 8, heads=2, blocks=1, dropout=0.0, train_negatives=5)
    step = SequenceBatcher(40, 6).training([[1, 2, 3], [4, 5, 6, 7]])
    torch.manual_seed(4)
    loss, stats = sasrec.loss(step)
    loss.backward()
    torch.manual_seed(4)
    sampled = set(draw_train_negatives(40, 5, torch.device("cpu")).tolist())
    touched = {int(i) for i in sasrec.item_emb.weight.grad.abs().sum(1).nonzero().flatten()}
    read, predicted = {1, 2, 4, 5, 6}, {2, 3, 5, 6, 7}  # inputs get a gradient through the encoder, targets through the loss
    assert touched == sampled | read | predicted  # far from all 40 rows, which the full softmax would touch
    assert stats["ce"] == pytest.approx(float(loss.detach()))


def test_fmoe_cdsr_mixture_stays_finite_when_every_target_is_a_negative():
    """N - 1 negatives of N items: a row's target is almost always drawn, so every CE term and
    the gated sum (which must not see -inf) go through the collision mask."""
    m = model(train_negatives=N - 1)
    for i in (1, 2):
        m.set_expert_state(i, m.expert_state(i))
    terms = m.loss_terms(batch(domain()))
    assert all(bool(torch.isfinite(t)) for t in terms.values())
    total = terms["ce"] + terms["ce_moe"]
    total.backward()
    gate_grads = [p.grad for p in m.gate.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in gate_grads) and any(bool(g.abs().sum() > 0) for g in gate_grads)


def test_fmoe_cdsr_sampled_loss_is_a_different_objective_but_the_same_scores():
    data = domain()
    full, sampled = model(data), model(data, train_negatives=5)
    inputs = SequenceBatcher(N, 5).evaluation(data.test)[0]
    full.eval(), sampled.eval()
    candidates = torch.arange(N).expand(len(data.test), N)
    torch.testing.assert_close(full.score_candidates(inputs, candidates), sampled.score_candidates(inputs, candidates))
    full.train(), sampled.train()
    torch.manual_seed(0)
    a = float(full.loss_terms(batch(data))["ce"].detach())
    torch.manual_seed(0)
    b = float(sampled.loss_terms(batch(data))["ce"].detach())
    assert b < a  # 6 candidates instead of 20: a smaller normaliser


def _config(root, method: str, train_negatives: int):
    cfg = default_config(data="fkcb", data_root=str(root), method=method, rounds=1, batch_size=32)
    return with_options(cfg, task_options={"embed_dim": 8, "max_len": 8, "negatives": 20, "train_negatives": train_negatives})


def test_too_many_training_negatives_name_the_option_and_the_largest_that_fits(fkcb_like):
    with pytest.raises(ValueError, match=r"--train-negatives N \(or \[task\] train_negatives = N\) with N <= 29"):
        build_experiment(resolve_experiment(_config(fkcb_like, "local", 500)))


def test_a_model_without_sampled_training_refuses_the_option(fkcb_like):
    def plain(cfg, domain, k, num_domains):
        return SASRecNextItem(domain.num_items if domain else 1, 8, 8)  # ignores [task] train_negatives

    resolved = resolve_experiment(_config(fkcb_like, "local", 5))
    with pytest.raises(ValueError, match=r"train_negatives = 5 .*SASRecNextItem does not train with sampled negatives"):
        task_for_data("fkcb").learners(resolved.cfg, [0], model=plain)


@pytest.mark.parametrize("head", ["linear", "tied"])
def test_a_branchs_sampled_scores_are_its_full_scores_columns(head):
    branch = model(head=head).branch(0)
    torch.manual_seed(5)
    z, targets, negatives = torch.randn(7, 8), torch.randint(N, (7,)), torch.tensor([3, 0, 11, 19])
    full = branch.scores(z)
    expected = torch.cat([full.gather(1, targets[:, None]), full[:, negatives]], dim=1)
    torch.testing.assert_close(branch.sampled_scores(z, targets, negatives), expected)


def test_full_softmax_training_draws_nothing_from_the_rng():
    """The default path consumes the node's random stream as before the option existed."""
    sasrec = SASRecNextItem(40, 6, 8, heads=2, blocks=1, dropout=0.0)
    step = SequenceBatcher(40, 6).training([[1, 2, 3], [4, 5, 6, 7]])
    state = torch.get_rng_state()
    sasrec.loss(step)
    assert torch.equal(torch.get_rng_state(), state)
    sasrec.train_negatives = 5
    sasrec.loss(step)
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("method", ["local", "fedsasrec", "fmoe-cdsr", "fmoe-cdsr-uniform"])
def test_the_built_in_sequential_methods_take_the_option(fkcb_like, method):
    experiment = build_experiment(resolve_experiment(_config(fkcb_like, method, 5)))
    models = [node.learner.model for name, node in experiment.nodes.items() if name in experiment.clients]
    assert len(models) == 3 and all(m.train_negatives == 5 for m in models)
