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
