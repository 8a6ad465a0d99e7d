"""Issue 29 item 4: run metrics also go to TensorBoard and MLflow, the values metrics.jsonl has."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.trackers import open_trackers, scalars


def test_a_metrics_line_becomes_named_scalars():
    row = {"node": "node-01", "round": 3, "train": {"train_loss": 0.5}, "metrics": {"accuracy": 0.75, "flag": True}, "bytes_sent": 10}
    assert scalars(row) == {"metrics/accuracy/node-01": 0.75, "train/train_loss/node-01": 0.5, "bytes/sent/node-01": 10.0}


def test_asking_for_a_tracker_that_is_not_installed_names_the_extra(monkeypatch, tmp_path):
    real = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard", name="tensorboard")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(ValueError, match=r"pip install 'p2pmoe\[track\]'"):
        open_trackers(str(tmp_path), None, "run", {})


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_a_simulation_writes_the_same_numbers_to_tensorboard_and_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from p2pmoe.sim.runner import run_simulation

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store for the test; users give a tracking server
    store = f"file:{tmp_path / 'mlruns'}"
    cfg = default_config(method="fedavg", data="fmnist", nodes=2, rounds=2, max_train_per_node=64, out=str(tmp_path / "run"))
    cfg = with_options(cfg, task_options={"global_test_size": 50}, tensorboard=str(tmp_path / "tb"), mlflow=store)
    run_simulation(cfg, progress=False, report=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = {(name, row["round"]): value for row in rows for name, value in scalars(row).items()}

    events = EventAccumulator(str(tmp_path / "tb" / "run"))
    events.Reload()
    seen = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert seen.keys() == expected.keys() and all(seen[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.data.params["run.method"] == "fedavg" and run.data.params["run.seed"] == "0"
    key = "metrics/accuracy/node-00"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
    assert history == {r: pytest.approx(v) for (name, r), v in expected.items() if name == key}
