"""`simulate --checkpoint-every / --resume`: an interrupted simulation goes on where it was
checkpointed and ends with the numbers and bytes of a run that was never interrupted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from p2pmoe.cli import main
from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.driver.runner import NodeRunner
from p2pmoe.node.checkpoint import CheckpointError, load_checkpoint
from p2pmoe.runs import cut_records, read_ledger, read_metrics
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.resume import CHECKPOINT_NAME, checkpoint_due
from p2pmoe.sim.runner import run_simulation

ROUNDS, CRASH_ROUND = 5, 3


class Crash(RuntimeError):
    pass


def _crash_at(monkeypatch: pytest.MonkeyPatch, round_index: int, node: str) -> None:
    """`node` dies when it starts training `round_index` (the others may have logged rows of
    that round already: the resume must drop them)."""
    train = NodeRunner.train

    def crashing(self: NodeRunner, r: int) -> dict[str, float]:
        if self.node_id == node and r == round_index:
            raise Crash(f"{node} killed in round {r}")
        return train(self, r)

    monkeypatch.setattr(NodeRunner, "train", crashing)


def _records(out: Path) -> tuple[list[tuple[int, str, str]], Counter]:
    rows = sorted((r["round"], r["node"], json.dumps(r, sort_keys=True)) for r in read_metrics(out / "metrics.jsonl"))
    return rows, Counter(read_ledger(out / "ledger.csv"))


def _interrupted_then_resumed(cfg: ExperimentConfig, out: Path, monkeypatch: pytest.MonkeyPatch, crash_node: str) -> dict:
    cfg = with_options(cfg, out=str(out))
    with monkeypatch.context() as patch:
        _crash_at(patch, CRASH_ROUND, crash_node)
        with pytest.raises(Crash):
            run_simulation(cfg, progress=False, report=False, checkpoint_every=2)
    checkpoint = load_checkpoint(out / CHECKPOINT_NAME)
    assert checkpoint is not None and checkpoint.round == 1  # after rounds 0-1; the stretch 2-3 died
    assert not (out / "summary.json").exists()
    return run_simulation(cfg, progress=False, report=False, checkpoint_every=2, resume=True)


def _assert_same_run(whole: dict, resumed: dict, whole_out: Path, resumed_out: Path) -> None:
    assert resumed["per_node"] == whole["per_node"] and resumed["metrics"] == whole["metrics"]
    assert resumed["bytes"] == whole["bytes"] and resumed["selection"] == whole["selection"]
    assert resumed["sim_seconds"] == whole["sim_seconds"]  # every message in its causal phase
    rows, ledger = _records(resumed_out)
    assert (rows, ledger) == _records(whole_out)  # every line, each once: nothing lost or repeated
    assert {r for r, _, _ in rows} == set(range(ROUNDS))


@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data installs dataset-fashion-mnist)")
@pytest.mark.slow  # the default suite keeps resume's exactness through the FMoE-CDSR test below
@pytest.mark.parametrize("method, options", [("fedavg", {}), ("fedmoe-da", {}), ("fedmoe-da", {"dp_clip": 1.0, "dp_noise": 0.01})])
def test_a_killed_fashion_mnist_run_resumes_to_the_numbers_of_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, options: dict
) -> None:
    """With DP, the public copy each node has released and its noise stream are checkpointed."""
    cfg = default_config(method=method, data="fmnist", nodes=3, rounds=ROUNDS, max_train_per_node=200, threads=1, device="cpu", eval_every=2)
    cfg = with_options(cfg, task_options={"global_test_size": 200}, method_options=options)
    whole = run_simulation(with_options(cfg, out=str(tmp_path / "whole")), progress=False, report=False)
    resumed = _interrupted_then_resumed(cfg, tmp_path / "resumed", monkeypatch, "node-01")
    _assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "resumed")
    assert 0.1 < resumed["metrics"]["accuracy"] <= 1.0


def test_fmoe_cdsr_with_adam_and_dropout_resumes_exactly(tmp_path: Path, fkcb_like: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server method whose clients train with Adam and dropout: the optimiser state, the
    RNG streams and the server's expert cache all come back from the checkpoint."""
    cfg = default_config(method="fmoe-cdsr", data="fkcb", data_root=str(fkcb_like), rounds=ROUNDS, batch_size=32, seed=5, threads=1, device="cpu")
    cfg = with_options(cfg, task_options={"embed_dim": 8, "max_len": 8, "negatives": 20})
    whole = run_simulation(with_options(cfg, out=str(tmp_path / "whole")), progress=False, report=False)
    resumed = _interrupted_then_resumed(cfg, tmp_path / "resumed", monkeypatch, "node-02")
    _assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "resumed")


def test_resume_refuses_another_experiments_checkpoint_and_keeps_its_files(tmp_path: Path, fkcb_like: Path) -> None:
    cfg = default_config(method="local", data="fkcb", data_root=str(fkcb_like), rounds=2, batch_size=32, threads=1, device="cpu", out=str(tmp_path / "run"))
    cfg = with_options(cfg, task_options={"embed_dim": 8, "max_len": 8, "negatives": 20})
    run_simulation(cfg, progress=False, report=False, checkpoint_every=1)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("metrics.jsonl", "ledger.csv", CHECKPOINT_NAME)}
    with pytest.raises(CheckpointError, match=r"another experiment \(differs in run\.seed: 1 in this run, 0 in the checkpoint\)"):
        run_simulation(with_options(cfg, seed=1), progress=False, report=False, resume=True)
    assert before == {name: (tmp_path / "run" / name).read_bytes() for name in before}
    # A finished run resumes to itself: no round runs again, the summary is rewritten.
    again = run_simulation(cfg, progress=False, report=False, resume=True)
    assert again["metrics"] == json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


def test_resume_without_a_checkpoint_starts_afresh_and_the_cli_explains_a_bad_one(tmp_path: Path, fkcb_like: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["simulate", "--method", "local", "--data", "fkcb", "--data-root", str(fkcb_like), "--rounds", "1", "--embed-dim", "8"]
    args += ["--negatives", "20", "--threads", "1", "--out", str(out), "--quiet", "--no-report", "--resume"]
    assert main(args) == 0
    assert "no checkpoint" in capsys.readouterr().err and (out / "summary.json").exists()
    (out / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        main(args)


def test_cut_records_drops_later_rounds_and_a_torn_last_line(tmp_path: Path) -> None:
    rows = [{"round": r, "node": "a"} for r in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "no')
    header = "round,src,dst,kind,header_bytes,payload_bytes,phase\n"
    (tmp_path / "ledger.csv").write_text(header + "0,a,b,x,1,2,0\n2,a,b,x,1,2,0\n3,a,b,x,1,2,1\n3,a,b")
    kept, entries = cut_records(tmp_path, 2)
    assert kept == rows[:3] and [e.round for e in entries] == [0, 2]
    assert read_metrics(tmp_path / "metrics.jsonl") == rows[:3] and read_ledger(tmp_path / "ledger.csv") == entries
    (tmp_path / "metrics.jsonl").write_text('{"round": 0\n{"round": 1, "node": "a"}\n')
    with pytest.raises(ValueError, match="line 1"):  # damage before the end is not a torn write
        cut_records(tmp_path, 2)


def test_checkpoints_fall_after_every_nth_round_and_the_last() -> None:
    assert [r for r in range(7) if checkpoint_due(r, 7, 3)] == [2, 5, 6]
    assert not any(checkpoint_due(r, 7, 0) for r in range(7))


def test_a_reply_to_a_message_that_waited_is_one_phase_after_it(tmp_path: Path, fkcb_like: Path) -> None:
    """FedSASRec: clients train one after another and their updates reach a server that has not
    entered the round yet, so they wait in its runner; its global model still answers them,
    one phase later, in round 0 as in every other round."""
    cfg = default_config(method="fedsasrec", data="fkcb", data_root=str(fkcb_like), rounds=2, batch_size=32, threads=1, device="cpu", out=str(tmp_path))
    run_simulation(with_options(cfg, task_options={"embed_dim": 8, "max_len": 8, "negatives": 20}), progress=False, report=False)
    phases = {(e.round, e.kind, e.phase) for e in read_ledger(tmp_path / "ledger.csv")}
    assert phases == {(r, kind, phase) for r in range(2) for kind, phase in (("model_update", 0), ("model_global", 1))}


def test_a_checkpoint_from_before_an_option_existed_is_of_the_same_experiment():
    """An option added since the checkpoint was written counts as its default; a real
    difference (another seed) still refuses it."""
    from p2pmoe.config import default_config, with_options
    from p2pmoe.experiment import resolve_experiment
    from p2pmoe.settings import canonical_config
    from p2pmoe.sim.resume import same_but_newer_defaults

    cfg = resolve_experiment(with_options(default_config(method="fedmoe-da"), method_options={"p": 1})).cfg
    stored = canonical_config(cfg)
    del stored["method"]["finetune_epochs"], stored["run"]["eval_point"]  # written before these options existed
    assert same_but_newer_defaults(stored, cfg)
    assert not same_but_newer_defaults(stored, with_options(cfg, method_options={"finetune_epochs": 1}))
    assert not same_but_newer_defaults({**stored, "run": {**stored["run"], "seed": 5}}, cfg)
    assert not same_but_newer_defaults("garbage", cfg)
