"""The multi-task family: AliExpress folders end to end with PF-MSMTrec, and ML-1M for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.data.errors import DataFormatError
from p2pmoe.experiment import resolve_experiment
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.base import task_for_data
from p2pmoe.tasks.multitask import feature_spec, scenarios


def _write_country(folder: Path, rows: int, seed: int, categorical: int = 3, numerical: int = 2) -> None:
    """A small AliExpress-layout CSV whose click and conversion depend on the features."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 40, size=(rows, categorical))
    num = rng.normal(size=(rows, numerical)).round(3)
    click = (rng.random(rows) < 1 / (1 + np.exp(-(num[:, 0] + (cat[:, 0] % 2) - 0.5)))).astype(int)
    conversion = click * (rng.random(rows) < 0.5 + 0.4 * (cat[:, 1] % 2 == 0)).astype(int)
    header = ["search_id", *(f"categorical_{i + 1}" for i in range(categorical)), *(f"numerical_{i + 1}" for i in range(numerical)), "click", "conversion"]
    lines = [",".join(header)]
    for i in range(rows):
        lines.append(",".join([str(i), *map(str, cat[i]), *map(str, num[i]), str(click[i]), str(conversion[i])]))
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("\n".join(lines) + "\n")


def _config(root: Path, method: str, rounds: int = 2, **task: object):  # type: ignore[no-untyped-def]
    cfg = default_config(method=method, data="aliexpress", data_root=str(root), rounds=rounds, batch_size=64, threads=1, out=str(root / "run"))
    opts = {"categorical_fields": 3, "numerical_fields": 2, "buckets": 32, "embed_dim": 4, "experts": 2, "expert_hidden": 8, "tower_hidden": 4, **task}
    return with_options(cfg, task_options=opts)


def test_aliexpress_reader_and_two_rounds_of_pf_msmtrec(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    for k, country in enumerate(["AliExpress_NL", "AliExpress_ES"]):
        _write_country(tmp_path / country, 400, seed=k)
    cfg = _config(tmp_path, "pf-msmtrec")
    found = scenarios(cfg)
    assert [s.name for s in found] == ["ES", "NL"]
    assert found[0].tasks == ("click", "conversion")
    assert found[0].categorical.max() < 32 and found[0].cardinalities == feature_spec(cfg).cardinalities
    summary = run_simulation(cfg, progress=False)
    assert set(summary["per_node"]) >= {"node-00", "node-01"}
    for key in ("auc", "auc/click", "auc/conversion", "logloss/click", "valid_auc"):
        assert 0.0 <= summary["metrics"][key] <= (1.0 if key.startswith(("auc", "valid")) else 10.0)
    assert summary["selection"]["key"] == "valid_auc"
    assert summary["bytes"]["by_kind"]["model_update"] > 0 and summary["bytes"]["by_kind"]["model_global"] > 0


def test_aliexpress_folder_with_other_columns_is_refused(tmp_path: Path) -> None:
    _write_country(tmp_path / "AliExpress_US", 50, seed=0, categorical=2)
    with pytest.raises(DataFormatError, match="categorical"):
        scenarios(_config(tmp_path, "local"))


def test_multitask_family_owns_its_data() -> None:
    assert task_for_data("ml-1m-mtl").name == task_for_data("aliexpress").name == "multitask"


def test_ml1m_smoke_one_round_of_pf_msmtrec(tmp_path: Path) -> None:
    """Real data, tiny: 10 users per age group, one round; every scenario reports both tasks."""
    torch.set_num_threads(1)
    cfg = default_config(method="pf-msmtrec", data="ml-1m-mtl", rounds=1, batch_size=256, threads=1, out=str(tmp_path / "run"))
    cfg = with_options(cfg, task_options={"users_per_scenario": 10, "embed_dim": 4, "expert_hidden": 8})
    summary = run_simulation(cfg, progress=False)
    assert len(summary["per_node"]) >= 7
    assert 0.5 < summary["metrics"]["auc/click"] <= 1.0  # popularity is learnable in one epoch
    assert 0.0 < summary["metrics"]["auc/like"] <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pf_msmtrec_daemons_match_the_simulator_and_a_killed_client_resumes(tmp_path: Path) -> None:
    """swarm equals simulate to the byte; a client killed with SIGKILL restarts from its
    checkpoint (server personalised state and client anchor included) and finishes."""
    import json
    import os
    import signal
    import time

    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import run_swarm, start_node, write_node_configs

    for k, country in enumerate(["AliExpress_NL", "AliExpress_ES"]):
        _write_country(tmp_path / "data" / country, 300, seed=k)
    cfg = _config(tmp_path / "data", "pf-msmtrec")
    swarm = run_swarm(resolve_experiment(with_options(cfg, out=str(tmp_path / "swarm"))), Timing(round_deadline=60, startup=60, linger=10))
    sim = run_simulation(with_options(cfg, out=str(tmp_path / "sim")), progress=False)
    assert set(swarm["exit_codes"].values()) == {0}
    kinds = {k: v for k, v in swarm["bytes"]["by_kind"].items() if k not in {"hello", "heartbeat", "error"}}
    assert kinds == sim["bytes"]["by_kind"] and swarm["metrics"] == sim["metrics"]

    run = tmp_path / "kill"
    cfg = with_options(cfg, rounds=4, out=str(run))
    timing = Timing(round_deadline=20, heartbeat=0.5, suspect_after=1.5, dead_after=3, startup=20, linger=5)
    configs = write_node_configs(resolve_experiment(cfg), run, timing)
    procs = {node: start_node(path, path.parent / "node.log") for node, path in configs.items()}
    victim = run / "nodes" / "node-01"

    def rounds_of(folder: Path) -> list[int]:
        path = folder / "metrics.jsonl"
        return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    try:
        started = time.monotonic()
        while not rounds_of(victim) and time.monotonic() - started < 120:
            time.sleep(0.1)
        os.kill(procs["node-01"].pid, signal.SIGKILL)
        procs["node-01"].wait(timeout=10)
        done_before = max(rounds_of(victim))
        time.sleep(timing.dead_after + 1)
        procs["node-01"] = start_node(configs["node-01"], victim / "node.log")
        for node, proc in procs.items():
            assert proc.wait(timeout=180) == 0, (run / "nodes" / node / "node.log").read_text()[-2000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert "resumed from" in (victim / "node.log").read_text()
    assert rounds_of(victim)[-1] == 3 and max(r for r in rounds_of(victim) if r <= done_before) == done_before
    assert rounds_of(run / "nodes" / "server") == [0, 1, 2, 3]
