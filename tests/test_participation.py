"""Partial participation's sample: a pure, seeded function every process computes alike."""

import subprocess
import sys

import pytest

from p2pmoe.config import default_config
from p2pmoe.participation import Participation, sample_clients, sample_size

IDS = [f"node-{k:02d}" for k in range(100)]


def test_fedavg_at_scale_samples_ten_of_a_hundred_seeded_and_fresh_each_round():
    samples = [sample_clients(7, r, IDS, 0.1) for r in range(20)]
    assert all(len(s) == 10 and s <= set(IDS) for s in samples)
    assert samples == [sample_clients(7, r, list(reversed(IDS)), 0.1) for r in range(20)]  # config order does not matter
    assert len(set(samples)) == 20  # independent rounds
    assert samples != [sample_clients(8, r, IDS, 0.1) for r in range(20)]  # the seed decides


def test_sample_size_is_floor_of_c_k_and_at_least_one():
    assert [sample_size(100, c) for c in (0.1, 0.29, 0.005, 1.0)] == [10, 29, 1, 100]
    assert sample_size(3, 0.5) == 1


def test_full_participation_is_everyone_and_servers_always_take_part():
    assert sample_clients(0, 5, IDS, 1.0) == set(IDS)
    part = Participation(0, 0.5, IDS[:4])
    assert not all(part.takes_part(n, r) for n in IDS[:4] for r in range(3))
    assert all(part.takes_part("server", r) for r in range(10))
    assert all(Participation().takes_part(n, r) for n in IDS for r in range(3))
    with pytest.raises(ValueError, match="participation"):
        Participation(0, 0.0, IDS)


def test_another_process_with_another_hash_seed_draws_the_same_sample():
    code = "from p2pmoe.participation import sample_clients; print(sorted(sample_clients(3, 4, [f'n{k}' for k in range(30)], 0.2)))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")
    }
    assert outputs == {f"{sorted(sample_clients(3, 4, [f'n{k}' for k in range(30)], 0.2))}\n"}


def test_the_run_option_is_a_fraction():
    assert default_config().run.participation == 1.0
    assert default_config(participation=0.1).run.participation == 0.1
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="participation"):
            default_config(participation=bad)


def test_availability_draws_each_node_alone_seeded_and_near_the_probability():
    from p2pmoe.participation import available_clients

    rounds = [available_clients(5, r, IDS, 0.3) for r in range(200)]
    share = sum(len(s) for s in rounds) / (200 * len(IDS))
    assert 0.27 < share < 0.33  # 20,000 draws: the standard error of the share is 0.003
    assert len({len(s) for s in rounds}) > 3  # the count varies from round to round (no fixed m)
    # A node's availability does not depend on which other nodes the run has.
    assert all(available_clients(5, r, IDS[:7], 0.3) == s & set(IDS[:7]) for r, s in enumerate(rounds[:20]))
    assert rounds[:20] != [available_clients(6, r, IDS, 0.3) for r in range(20)]
    assert available_clients(5, 3, IDS, 1.0) == set(IDS)


def test_the_run_decides_the_meaning_by_whether_the_method_has_a_server():
    from p2pmoe.methods.registry import run_participation

    clients = IDS[:20]
    for method, mode in (
        ("fedavg", "sample"),
        ("fedavg-ft", "sample"),
        ("fedrep", "sample"),
        ("local", "availability"),
        ("fedmoe-da", "availability"),
        ("gossip", "availability"),
    ):
        part = run_participation(default_config(method=method, nodes=20, participation=0.5), clients)
        assert part.mode == mode, method
        counts = {len(part.sampled(r)) for r in range(30)}
        assert (counts == {10}) == (mode == "sample"), method
    with pytest.raises(ValueError, match="mode"):
        Participation(0, 0.5, IDS, mode="sometimes")
