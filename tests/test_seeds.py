"""Issue 27 item 5: every per-node stream comes from one derivation, and building a run leaves
torch's global generator as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.seeds import node_stream, runner_stream, seeded_init

SHOP = Path(__file__).parent / "fixtures" / "shop"


def test_streams_keep_the_formulas_runs_were_made_with():
    assert node_stream(3, "shuffle", 2) == 3002 and node_stream(3, "cap", 2) == 5 and node_stream(3, "gate", 2) == 3_000_011
    assert resolve_experiment(default_config(seed=3)).node_seed("node-01") == runner_stream(3, "node-01") != runner_stream(3, "node-02")
    with pytest.raises(ValueError, match="unknown stream"):
        node_stream(0, "dropout", 0)


def test_seeded_init_draws_from_the_seed_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded_init(7):
        first = torch.rand(3)
    with seeded_init(7):
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("data, method", [("atomic", "fmoe-cdsr"), ("atomic-timelines", "fedavg")])
def test_building_a_run_does_not_touch_the_global_generator_and_clients_start_alike(data, method):
    cfg = with_options(default_config(method=method, data=data, data_root=str(SHOP), nodes=5 if data == "atomic" else 2), task_options={"negatives": 20})
    before = torch.get_rng_state()
    experiment = build_experiment(resolve_experiment(cfg))
    assert torch.equal(torch.get_rng_state(), before)
    if data == "atomic-timelines":
        first, second = (experiment.nodes[c].learner.model.state_dict() for c in experiment.clients)
        assert all(torch.equal(first[name], second[name]) for name in first)
