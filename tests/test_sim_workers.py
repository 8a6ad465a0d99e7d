"""The simulator with workers: several nodes' training and evaluation at once, same numbers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.methods.local import LocalMethod
from p2pmoe.runs import read_ledger
from p2pmoe.sim.bus import GlobalRNGUsed, SimNetwork
from p2pmoe.sim.runner import run_simulation


class _Learner:
    """A learner whose training waits at a shared barrier and may draw from torch's global RNG."""

    num_train_examples = 1

    def __init__(self, barrier: threading.Barrier | None = None, draw: bool = False) -> None:
        self.barrier, self.draw = barrier, draw

    def train(self, epochs: int) -> dict[str, float]:
        if self.barrier is not None:
            self.barrier.wait()  # every node of the round inside `train` at once, or BrokenBarrierError
        return {"train_loss": float(torch.rand(1)) if self.draw else 0.0}

    def evaluate(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def _network(workers: int, barrier: threading.Barrier | None = None, draw: bool = False) -> SimNetwork:
    return SimNetwork({n: LocalMethod(n, _Learner(barrier, draw)) for n in ("a", "b")}, workers=workers)  # type: ignore[arg-type]


def test_with_two_workers_two_nodes_train_at_the_same_time() -> None:
    assert set(_network(2, threading.Barrier(2, timeout=30)).run_round(0)) == {"a", "b"}
    with pytest.raises(threading.BrokenBarrierError):  # one at a time, the first node waits alone
        _network(1, threading.Barrier(2, timeout=0.2)).run_round(0)


def test_a_method_drawing_from_the_global_rng_stops_a_parallel_run() -> None:
    assert set(_network(1, draw=True).run_round(0)) == {"a", "b"}  # one at a time each node has its own stream
    before = torch.get_rng_state()
    with pytest.raises(GlobalRNGUsed, match="--workers 1"):
        _network(2, draw=True).run_round(0)
    assert torch.equal(torch.get_rng_state(), before)  # the run leaves the process's stream as it found it


def test_a_failing_node_stops_the_run_before_the_queued_calls_start() -> None:
    """Eight nodes, two workers: node "a" fails at once; the calls still queued are cancelled,
    not run (a round of training for every node otherwise)."""
    started: list[str] = []

    class Failing(_Learner):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def train(self, epochs: int) -> dict[str, float]:
            started.append(self.name)
            if self.name == "a":
                raise RuntimeError("node a failed")
            time.sleep(0.3)
            return {"train_loss": 0.0}

    names = "abcdefgh"
    network = SimNetwork({n: LocalMethod(n, Failing(n)) for n in names}, workers=2)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="node a failed"):
        network.run_round(0)
    assert "a" in started and len(started) < len(names)


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        _network(0)


@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data installs dataset-fashion-mnist)")
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "fedmoe-da", "gossip"])
def test_two_workers_give_the_numbers_and_bytes_of_one_at_a_time(tmp_path: Path, method: str) -> None:
    """Real data: every metric of every node, every counted byte and every message's phase
    equal, to the last digit."""

    def run(workers: int) -> dict:
        cfg = default_config(
            method=method, data="fmnist", nodes=4, rounds=2, max_train_per_node=300, threads=1, workers=workers, device="cpu", out=str(tmp_path / f"w{workers}")
        )
        return run_simulation(with_options(cfg, task_options={"global_test_size": 300}), progress=False, report=False)

    one, two = run(1), run(2)
    assert one["per_node"] == two["per_node"] and one["metrics"] == two["metrics"]
    assert one["bytes"] == two["bytes"]
    # Every message with its causal phase, so the simulated link time is the same too.
    assert Counter(read_ledger(tmp_path / "w1" / "ledger.csv")) == Counter(read_ledger(tmp_path / "w2" / "ledger.csv"))
    assert one["sim_seconds"] == two["sim_seconds"]
    assert 0.1 < one["metrics"]["accuracy"] <= 1.0
