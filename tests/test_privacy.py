"""Issue 30 item 3: client-level DP for FedAvg (clip, Gaussian noise at the server) with the
privacy spent from dp-accounting's RDP accountant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.methods.fedavg import FedAvgOptions
from p2pmoe.methods.privacy import dp_mean, epsilon


def test_updates_are_clipped_to_s_and_the_noise_has_sigma_s_over_m():
    centre = {"w": torch.zeros(3)}
    states = [{"w": torch.tensor([3.0, 4.0, 0.0])}, {"w": torch.tensor([0.3, 0.4, 0.0])}]  # norms 5 and 0.5
    quiet = dp_mean(states, centre, clip=1.0, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert quiet["w"].tolist() == pytest.approx([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2, 0.0])  # the first clipped to norm 1
    noisy = dp_mean([{"w": torch.zeros(50_000)}] * 4, {"w": torch.zeros(50_000)}, clip=2.0, noise=1.5, generator=torch.Generator().manual_seed(0))
    assert float(noisy["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)


def test_the_privacy_spent_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    base = epsilon(1.0, 1.0, 20, 0.1)
    assert epsilon(1.0, 1.0, 40, 0.1) > base > epsilon(2.0, 1.0, 20, 0.1) > 0
    assert epsilon(1.0, 0.1, 20, 0.1) < base  # subsampling amplifies privacy
    with pytest.raises(ValueError, match="go together"):
        FedAvgOptions(dp_clip=1.0)
    with pytest.raises(ValueError, match="mean only"):
        FedAvgOptions(dp_clip=1.0, dp_noise=1.0, aggregation="median")


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_a_dp_run_reports_epsilon_at_one_over_n(tmp_path):
    from p2pmoe.sim.runner import run_simulation

    cfg = default_config(method="fedavg", data="fmnist", nodes=4, rounds=2, max_train_per_node=64, out=str(tmp_path))
    cfg = with_options(cfg, task_options={"global_test_size": 50}, method_options={"dp_clip": 1.0, "dp_noise": 1.2})
    summary = run_simulation(cfg, progress=False, report=False)
    assert summary["privacy"]["delta"] == 0.25 and summary["privacy"]["epsilon"] == pytest.approx(epsilon(1.2, 1.0, 2, 0.25))


def test_a_node_releases_its_public_copy_moved_by_a_clipped_step_and_noise():
    """FedMoE-DA's node-level DP: each release is P + clip(private − P, S) + N(0, (σS)²), so
    two data sets' releases differ by at most 2S before noise; ε uses σ/2."""
    from p2pmoe.methods.privacy import NoisyRelease, node_epsilon

    quiet = NoisyRelease({"w": torch.zeros(3)}, clip=1.0, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert quiet.release({"w": torch.tensor([3.0, 4.0, 0.0])})["w"].tolist() == pytest.approx([0.6, 0.8, 0.0])
    assert quiet.release({"w": torch.tensor([0.6, 0.8, 0.5])})["w"].tolist() == pytest.approx([0.6, 0.8, 0.5])  # inside S: as it is
    a = NoisyRelease({"w": torch.zeros(3)}, 1.0, 0.0, torch.Generator()).release({"w": torch.tensor([100.0, 0.0, 0.0])})["w"]
    b = NoisyRelease({"w": torch.zeros(3)}, 1.0, 0.0, torch.Generator()).release({"w": torch.tensor([-100.0, 0.0, 0.0])})["w"]
    assert float((a - b).norm()) == pytest.approx(2.0)  # the sensitivity the accountant is told
    noisy = NoisyRelease({"w": torch.zeros(50_000)}, clip=2.0, noise=1.5, generator=torch.Generator().manual_seed(0))
    assert float(noisy.release({"w": torch.zeros(50_000)})["w"].std()) == pytest.approx(3.0, rel=0.03)
    assert node_epsilon(1.5, 10, 0.1) == pytest.approx(epsilon(0.75, 1.0, 10, 0.1))


def test_fedmoe_da_peers_see_only_the_noisy_release_and_the_node_keeps_its_own_model():
    from p2pmoe.learners.vision import ImageClassifierLearner
    from p2pmoe.methods.fedmoe_da import FedMoEDANode, FedMoEDAOptions, expert_tensors
    from p2pmoe.models import MoEClassifier
    from p2pmoe.models.params import float_state
    from p2pmoe.wire.messages import Message, MessageKind

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    learner = ImageClassifierLearner(
        MoEClassifier(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), 8, 3, 8, 2), (x, y), (x, y), batch_size=16, lr=0.1
    )
    node = FedMoEDANode("n0", learner, ["n1"], ["n1"], p=1, dp=(0.5, 1.0, 7))
    node.train_local(0)
    sends = node.start_round(0)
    phi_sent = next(s for s in sends if s.message.kind is MessageKind.EMBEDDING).message.tensors
    gate_sent = next(s for s in sends if s.message.kind is MessageKind.GATE_PUBLISH).message.tensors["gate"]
    assert not torch.equal(gate_sent, learner.model.moe.gating_matrix().detach())  # the gate is released too (review finding)
    own_phi = float_state(learner.model, "embedder.")
    assert set(phi_sent) == set(own_phi) and all(not torch.equal(phi_sent[k], v) for k, v in own_phi.items())
    reply = node.on_message("n1", Message(MessageKind.EXPERT_REQUEST, 0, meta={"req": 1, "slots": [0, 1]}))[0].message.tensors
    private = expert_tensors({s: learner.model.moe.expert_state(s) for s in (0, 1)})
    assert set(reply) == set(private) and all(not torch.equal(reply[k], private[k]) for k in private)
    name = "expert.0." + next(iter(learner.model.moe.expert_state(0)))
    assert torch.equal(node.state_dict()["dp_public." + name], reply[name])  # the checkpoint keeps what peers have seen
    with pytest.raises(ValueError, match="go together"):
        FedMoEDAOptions(dp_clip=1.0)


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_a_fedmoe_da_dp_run_reports_each_nodes_epsilon(tmp_path):
    from p2pmoe.methods.privacy import node_epsilon
    from p2pmoe.sim.runner import run_simulation

    cfg = default_config(method="fedmoe-da", data="fmnist", nodes=4, rounds=2, max_train_per_node=64, out=str(tmp_path))
    cfg = with_options(cfg, task_options={"global_test_size": 50}, method_options={"dp_clip": 1.0, "dp_noise": 2.0})
    privacy = run_simulation(cfg, progress=False, report=False)["privacy"]
    assert privacy["delta"] == 0.25 and privacy["epsilon"] == pytest.approx(node_epsilon(2.0, 2, 0.25)) and "node" in privacy["unit"]
