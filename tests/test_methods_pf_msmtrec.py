"""PF-MSMTrec: the template, the server's arithmetic, refusal of bad uploads, client and server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p2pmoe.methods.pf_aggregation import aggregate_group, average_touched_rows, cosine_softmax, denormalise, normalise, project_conflicts, stats
from p2pmoe.methods.pf_msmtrec import UNDELIVERED_KEY, PFMSMTrecOptions, PFMSMTrecServer, group_of, plan_for
from p2pmoe.models import MMoE
from p2pmoe.models.params import float_state
from p2pmoe.models.template import TemplateLinear, template_part
from p2pmoe.participation import Participation
from p2pmoe.wire.codec import ProtocolError
from p2pmoe.wire.messages import Message, MessageKind


def _mmoe(template: bool) -> MMoE:
    torch.manual_seed(0)
    return MMoE([5, 7], 2, embed_dim=3, num_experts=2, expert_hidden=[6, 4], num_tasks=2, tower_hidden=3, template=template)


def test_template_parts_sum_to_the_weights_the_forward_pass_uses() -> None:
    model = _mmoe(template=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if template_part(name)[0] in ("task", "scen"):
                p.normal_()  # make every part matter
    layer = model.experts[1].layers[0]
    assert isinstance(layer, TemplateLinear)
    w, b = layer.weights(1)
    torch.testing.assert_close(w, layer.glob.weight + layer.task[1].weight + layer.scen.weight)
    torch.testing.assert_close(b, layer.glob.bias + layer.task[1].bias + layer.scen.bias)
    categorical = torch.stack([torch.randint(0, 5, (8,)), torch.randint(0, 7, (8,))], dim=1)
    numerical = torch.randn(8, 2)
    logits = model(categorical, numerical)
    for t in range(2):  # a plain MMoE with the summed weights of task t computes task t's logit
        plain = _mmoe(template=False)
        plain.load_state_dict({n: v for n, v in model.state_dict().items() if not n.startswith("experts.")}, strict=False)
        with torch.no_grad():
            for e, expert in enumerate(model.experts):
                for i, layer in enumerate(expert.layers):
                    weight, bias = layer.weights(t)
                    plain.experts[e].linears[i].weight.copy_(weight)
                    plain.experts[e].linears[i].bias.copy_(bias)
        torch.testing.assert_close(plain(categorical, numerical)[:, t], logits[:, t])


def test_fresh_template_starts_as_its_global_part() -> None:
    model = _mmoe(template=True)
    parts = {template_part(n)[0] for n in float_state(model)}
    assert parts == {"glob", "task", "scen", "other"}
    assert all(t.abs().sum() == 0 for n, t in float_state(model).items() if template_part(n)[0] in ("task", "scen"))


def test_parameter_fedbn_returns_own_tensor_when_all_uploads_agree() -> None:
    torch.manual_seed(1)
    theta = {"w": torch.randn(4, 3) * 2 + 0.5, "b": torch.randn(4)}
    uploads = [dict(theta) for _ in range(3)]
    weights = torch.full((3, 3), 1 / 3)
    out = aggregate_group(uploads, uploads, weights, conflict=False, fedbn=True)
    for state in out:
        for name in theta:
            torch.testing.assert_close(state[name], theta[name])


def test_normalise_uses_pooled_statistics_and_denormalise_uses_own() -> None:
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([4.0, 6.0])
    (za, zb), pooled = normalise([a, b])
    assert pooled.mean == pytest.approx(3.0) and pooled.std == pytest.approx(math.sqrt(5.0))
    torch.testing.assert_close(za, (a - 3.0) / math.sqrt(5.0))
    back = denormalise((za + zb) / 2, stats(a))  # the average, in a's own scale (mean 1, std 1)
    r = 1 / math.sqrt(5.0)
    torch.testing.assert_close(back, torch.tensor([1.0 - r, 1.0 + r]))


def test_conflict_projection_removes_exactly_the_conflicting_component() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # dot = -1: they conflict
    out = project_conflicts(g)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.5]))  # g1 - (-1 / 2) g2
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1.0]))  # g2 - (-1 / 1) g1
    assert torch.dot(out[0], g[1]).abs() < 1e-6 and torch.dot(out[1], g[0]).abs() < 1e-6
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(project_conflicts(agreeing), agreeing)


def test_personalised_weights_are_a_hand_computed_cosine_softmax() -> None:
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    tau = 0.5
    c = 1 / math.sqrt(2)
    cos = [[1, 0, c], [0, 1, c], [c, c, 1]]
    expected = [[math.exp(x / tau) / sum(math.exp(y / tau) for y in row) for x in row] for row in cos]
    torch.testing.assert_close(cosine_softmax(v, tau), torch.tensor(expected))


def test_groups_and_plans() -> None:
    opts = PFMSMTrecOptions()
    assert group_of("experts.1.layers.0.glob.weight") == "experts.1.glob"
    assert group_of("experts.1.layers.0.task.1.bias") == "experts.1.task.1"
    assert group_of("experts.0.layers.0.scen.weight") == "experts.0.scen"
    assert group_of("experts.0.linears.0.weight") == "experts.0"
    assert group_of("towers.1.linears.0.weight") == group_of("gates.1.proj.weight") == "task.1"
    assert plan_for("experts.0.scen", opts).personal and not plan_for("experts.0.glob", opts).personal
    assert plan_for("experts.0.glob", opts).coordinated and not plan_for("embeddings", opts).coordinated
    assert not plan_for("task.0", PFMSMTrecOptions(personalised=False)).personal


def _server(opts: PFMSMTrecOptions | None = None) -> tuple[PFMSMTrecServer, dict[str, torch.Tensor]]:
    template = float_state(_mmoe(template=True))
    server = PFMSMTrecServer("server", ["a", "b", "c"], template, opts or PFMSMTrecOptions())
    server.start_round(0)
    return server, template


def _upload(state: dict[str, torch.Tensor], count: int = 10) -> Message:
    return Message(MessageKind.MODEL_UPDATE, 0, state, {"num_examples": count})


def _bumped(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in template.items()}


@pytest.mark.parametrize("poison", ["nan", "shape", "missing", "count"])
def test_poisoned_upload_changes_nothing_and_round_goes_on(poison: str) -> None:
    server, template = _server()
    before = {k: v.clone() for k, v in server.state_dict().items()}
    bad = _bumped(template, 1)
    name = next(iter(bad))
    count = 10
    if poison == "nan":
        bad[name] = bad[name].clone()
        bad[name].view(-1)[0] = float("nan")
    elif poison == "shape":
        bad[name] = torch.zeros(3, 3)
    elif poison == "missing":
        del bad[name]
    else:
        count = -1
    with pytest.raises(ProtocolError):
        server.on_message("a", _upload(bad, count))
    assert not server._updates
    assert all(torch.equal(before[k], v) for k, v in server.state_dict().items())
    assert server.on_message("b", _upload(_bumped(template, 2))) == []
    assert server.on_message("c", _upload(_bumped(template, 3))) == []
    sends = server.on_deadline(0)  # "a" never got a valid upload in: the others are served
    assert sorted(s.dst for s in sends) == ["b", "c"]
    assert all(torch.isfinite(t).all() for s in sends for t in s.message.tensors.values())


def test_server_personalises_and_resumes_from_its_checkpoint() -> None:
    server, template = _server()
    sends = []
    for k, client in enumerate(["a", "b", "c"]):
        sends += server.on_message(client, _upload(_bumped(template, k)))
    assert sorted(s.dst for s in sends) == ["a", "b", "c"]
    by = {s.dst: s.message.tensors for s in sends}
    scen = "experts.0.layers.0.scen.weight"
    assert not torch.allclose(by["a"][scen], by["b"][scen])  # personalised
    emb = "embeddings.0.weight"
    torch.testing.assert_close(by["a"][emb], by["b"][emb])  # averaged
    restored, _ = _server()
    restored.load_state_dict(server.state_dict())
    assert all(torch.equal(restored.sent["c"][n], by["c"][n]) for n in template)
    with pytest.raises(ProtocolError):
        restored.load_state_dict({})


def test_embedding_rows_average_over_the_clients_that_changed_them() -> None:
    base = torch.zeros(3, 2)
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])  # changed rows 0 and 2
    b = torch.tensor([[3.0, 3.0], [0.0, 0.0], [0.0, 0.0]])  # changed row 0 only
    out = average_touched_rows([a, b], base, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(out, torch.tensor([[2.5, 2.5], [0.0, 0.0], [2.0, 0.0]]))


def test_client_adopts_its_state_anchors_training_and_refuses_garbage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from p2pmoe.data.multitask import ScenarioData
    from p2pmoe.learners.multitask import MultiTaskLearner
    from p2pmoe.methods.pf_msmtrec import PFMSMTrecClient

    rng = np.random.default_rng(0)
    n = 60
    data = ScenarioData(
        "s",
        rng.integers(0, 5, (n, 2)),
        ("a", "b"),
        (5, 7),
        rng.normal(size=(n, 2)).astype(np.float32),
        ("x", "y"),
        rng.integers(0, 2, (n, 2)).astype(np.float32),
        ("click", "like"),
        np.arange(48),
        np.arange(48, 60),
    )
    learner = MultiTaskLearner(_mmoe(template=True), data, np.arange(40, 48), batch_size=16)
    client = PFMSMTrecClient("a", learner, "server", PFMSMTrecOptions(prox=0.5))
    [send] = client.start_round(0)
    assert send.dst == "server" and set(send.message.tensors) == set(float_state(learner.model))
    target = {k: v + 1.0 for k, v in send.message.tensors.items()}
    bad = dict(target)
    name = next(iter(bad))
    bad[name] = torch.full_like(bad[name], float("inf"))
    with pytest.raises(ProtocolError):
        client.on_message("server", Message(MessageKind.MODEL_GLOBAL, 0, bad))
    assert not client.round_complete() and not learner.anchor
    client.on_message("server", Message(MessageKind.MODEL_GLOBAL, 0, target))
    assert client.round_complete()
    assert all(torch.equal(float_state(learner.model)[k], v) for k, v in target.items())
    assert learner.prox_weight == 0.5 and set(learner.anchor) == {n for n, _ in learner.model.named_parameters()}
    restored = PFMSMTrecClient("a", MultiTaskLearner(_mmoe(template=True), data, np.arange(40, 48)), "server", PFMSMTrecOptions(prox=0.5))
    restored.load_state_dict(client.state_dict())
    assert all(torch.equal(restored.learner.anchor[k], v) for k, v in learner.anchor.items())


def test_running_statistics_never_leave_and_classic_fedbn_keeps_norms_home() -> None:
    from p2pmoe.methods.pf_msmtrec import shared_names

    torch.manual_seed(0)
    model = MMoE([5], 0, embed_dim=3, num_experts=2, expert_hidden=[4], num_tasks=2, tower_hidden=3, template=True, expert_norm=True)
    names = shared_names(model, PFMSMTrecOptions())
    assert "norms.0.weight" in names and not any("running" in n for n in names)
    classic = shared_names(model, PFMSMTrecOptions(fedbn="classic"))
    assert not any(n.startswith("norms.") for n in classic) and set(classic) < set(names)


def test_diagnostics_report_self_weight_and_conflicts() -> None:
    from p2pmoe.methods.pf_aggregation import conflict_share

    assert conflict_share(torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]])) == pytest.approx(2 / 6)
    server, template = _server()
    for k, client in enumerate(["a", "b", "c"]):
        server.on_message(client, _upload(_bumped(template, k)))
    diagnostics = server.diagnostics()
    assert diagnostics["clients"] == 3 and 1 / 3 < diagnostics["mean_self_weight"] <= 1.0
    assert 0.0 <= diagnostics["conflicting_pair_share"] <= 1.0


def test_a_restarted_server_still_delivers_a_state_computed_while_its_client_sat_out() -> None:
    """Participation 1/3: a client that uploads in round r and is not sampled in r + 1 gets its
    new state only when next sampled; a server restarted in between must still send it."""
    template = float_state(_mmoe(template=True))
    clients = ["a", "b", "c"]
    participation = Participation(0, 1 / 3, clients)
    r = next(r for r in range(50) if participation.sampled(r) != participation.sampled(r + 1))
    (x,) = participation.sampled(r)
    later = next(s for s in range(r + 2, 100) if x in participation.sampled(s))
    server = PFMSMTrecServer("server", clients, template, PFMSMTrecOptions(), participation)
    server.start_round(r)
    assert [s.dst for s in server.on_message(x, Message(MessageKind.MODEL_UPDATE, r, _bumped(template, 1), {"num_examples": 10}))] == []
    restored = PFMSMTrecServer("server", clients, template, PFMSMTrecOptions(), participation)
    restored.load_state_dict(server.state_dict())
    for s in range(r + 1, later):  # rounds x sits out: whoever is sampled uploads
        restored.start_round(s)
        (y,) = participation.sampled(s)
        sends = restored.on_message(y, Message(MessageKind.MODEL_UPDATE, s, _bumped(template, s), {"num_examples": 10}))
        assert (x in [d.dst for d in sends]) == (s == later - 1)
    bad = {**server.state_dict(), UNDELIVERED_KEY: torch.ones(2, dtype=torch.uint8)}
    with pytest.raises(ProtocolError):
        restored.load_state_dict(bad)
