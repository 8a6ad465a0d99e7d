"""The benchmark harness: variants x seeds, finished runs read back, other settings rerun."""

from pathlib import Path

import pytest

import p2pmoe.harness as harness
from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.harness import Variant, finished_summary, run_seeds

pytestmark = pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")


@pytest.mark.slow
def test_finished_runs_are_read_back_and_only_the_missing_ones_run(tmp_path, monkeypatch):
    calls = []
    real = harness.run_simulation

    def counted(cfg, **kwargs):
        calls.append((cfg.run.method, cfg.run.seed))
        return real(cfg, **kwargs)

    monkeypatch.setattr(harness, "run_simulation", counted)
    base = with_options(default_config(data="fmnist", nodes=2, rounds=1, max_train_per_node=40, threads=1), task_options={"global_test_size": 50})
    variants = [Variant("alone", "local"), Variant("fedavg 50%", "fedavg", run={"participation": 0.5})]
    first = run_seeds(base, variants, [0, 1], tmp_path)
    assert calls == [("local", 0), ("fedavg", 0), ("local", 1), ("fedavg", 1)]
    assert (tmp_path / "fedavg_50_" / "seed1" / "summary.json").is_file()
    assert first[1].summary["setting"]["run"]["participation"] == 0.5 and first[2].seed == 1

    again = run_seeds(base, variants, [0, 1, 2], tmp_path, only_finished=True)
    assert len(calls) == 4 and [(r.label, r.seed) for r in again] == [(r.label, r.seed) for r in first]
    assert [r.summary for r in again] == [r.summary for r in first]

    run_seeds(with_options(base, rounds=2), variants[:1], [0], tmp_path)  # another setting in the same folder: run again
    assert calls[-1] == ("local", 0) and len(calls) == 5


def test_a_torn_summary_is_not_a_finished_run(tmp_path):
    cfg = default_config(out=str(tmp_path))
    (tmp_path / "summary.json").write_text('{"setting": ')
    assert finished_summary(tmp_path, cfg) is None
