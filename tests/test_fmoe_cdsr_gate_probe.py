"""The gate probe scores one FMoE-CDSR run's branches with other mixes (bench/fmoe_cdsr_gate_probe.py)."""

import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pmoe.models.fmoe_cdsr import FMoECDSR, transition_adjacency
from p2pmoe.runs import read_metrics

BENCH = Path(__file__).parent.parent / "bench"
OPTIONS = ["--data", "fkcb", "--rounds", "2", "--embed-dim", "8", "--max-len", "8", "--negatives", "20", "--threads", "1"]


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _checkpointed(fkcb_like: Path, tmp_path: Path, method: str) -> Path:
    """A 2-round run of `method` by bench_fmoe_cdsr, checkpointed; its run folder."""
    args = ("--data-root", str(fkcb_like), "--only", method, "--name", "b", "--results", str(tmp_path), "--checkpoint-every", "1")
    bench = _run("bench_fmoe_cdsr.py", *OPTIONS, *args, cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    return tmp_path / "runs" / "bench_b" / method


def _probe(fkcb_like: Path, tmp_path: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ("--data-root", str(fkcb_like), "--run-folder", str(folder), "--name", "p", "--results", str(tmp_path))
    return _run("fmoe_cdsr_gate_probe.py", *OPTIONS, *args, *extra, cwd=tmp_path)


def _last_round(folder: Path) -> dict[str, dict]:
    """Each client's metrics.jsonl row of the run's last (second) round."""
    return {r["node"]: r["metrics"] for r in read_metrics(folder / "metrics.jsonl") if r["round"] == 1 and r["node"].startswith("node-")}


@pytest.mark.slow
def test_probe_reproduces_the_runs_own_score_and_bounds_the_constant_mixes(fkcb_like, tmp_path):
    folder = _checkpointed(fkcb_like, tmp_path, "fmoe-cdsr")
    before = _digest(folder)
    probe = _probe(fkcb_like, tmp_path, folder)
    assert probe.returncode == 0, probe.stderr
    assert _digest(folder) == before  # the probe only reads the run
    rows = {r["client"]: r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    assert set(rows) == {"node-00", "node-01", "node-02", "mean"}
    last = _last_round(folder)
    for node, row in rows.items():
        if node == "mean":
            continue
        # the learned mix is the run's own model: the score its last round logged
        assert abs(row["learned test"] - 100 * last[node]["mrr"]) < 1e-6
        assert abs(row["learned valid"] - 100 * last[node]["valid_mrr"]) < 1e-6
        assert abs(row["gate own % test"] - 100 * last[node]["gate_mean/own"]) < 1e-6
        # the tuned constant is one of the grid's own weights or the equal mix's (1/3 here)
        assert row["tuned own weight"] in [w / 10 for w in range(11)] + [1 / 3]
    assert "--data-root DIR" in (tmp_path / "p.md").read_text()
    assert str(fkcb_like) not in (tmp_path / "p.json").read_text() + (tmp_path / "p.md").read_text()


@pytest.mark.slow
def test_probe_scores_a_uniform_run_without_gate_columns(fkcb_like, tmp_path):
    folder = _checkpointed(fkcb_like, tmp_path, "fmoe-cdsr-uniform")
    probe = _probe(fkcb_like, tmp_path, folder, "--method", "fmoe-cdsr-uniform")
    assert probe.returncode == 0, probe.stderr
    last = _last_round(folder)
    for row in json.loads((tmp_path / "p.json").read_text())["rows"]:
        assert not any(k.startswith(("learned", "gate")) for k in row)
        if row["client"] != "mean":  # the run's own mix is the equal one
            assert abs(row["equal test"] - 100 * last[row["client"]]["mrr"]) < 1e-6


@pytest.mark.slow
def test_probe_refuses_a_checkpoint_of_another_setting(fkcb_like, tmp_path):
    folder = _checkpointed(fkcb_like, tmp_path, "fmoe-cdsr")
    changed = [o if o != "8" else "16" for o in OPTIONS]  # another hidden size and length
    probe = _run("fmoe_cdsr_gate_probe.py", *changed, "--data-root", str(fkcb_like), "--run-folder", str(folder), cwd=tmp_path)
    assert probe.returncode == 1 and "belongs to another experiment" in probe.stderr and "embed_dim" in probe.stderr
    empty = _probe(fkcb_like, tmp_path, tmp_path)
    assert empty.returncode == 1 and "no checkpoint.safetensors" in empty.stderr


def _probe_module():
    sys.path.insert(0, str(BENCH))  # a script, not a module of the package
    try:
        return importlib.import_module("fmoe_cdsr_gate_probe")
    finally:
        sys.path.remove(str(BENCH))


def test_probability_mixture_is_the_log_of_the_weighted_branch_probabilities():
    probe = _probe_module()
    torch.manual_seed(0)
    train = [[1, 2, 3], [4, 5, 6, 7], [2, 9, 11]]
    m = FMoECDSR(20, 3, 0, transition_adjacency(train, 20), max_len=5, hidden=8, heads=2, blocks=1, gate_hidden=(16, 8))
    m.set_expert_state(1, m.expert_state(1))  # a second branch arrives
    m.eval()
    inputs, candidates = torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 6))
    logits, weights = m.branch_logits(inputs)
    assert set(logits) == {0, 1} and torch.allclose(weights.sum(dim=-1), torch.ones(len(weights)))
    mixed = probe.ProbabilityMixture(m).score_candidates(inputs, candidates)
    expected = (weights[:, :1] * logits[0].softmax(-1) + weights[:, 1:2] * logits[1].softmax(-1)).log().gather(1, candidates)
    assert torch.allclose(mixed, expected, atol=1e-5)
    with probe.mixed_as(m, 1.0):  # the own branch alone: its log-probabilities, the logits' ranking
        alone = probe.ProbabilityMixture(m).score_candidates(inputs, candidates)
        assert torch.allclose(alone, logits[0].log_softmax(-1).gather(1, candidates), atol=1e-5)
        assert torch.equal(alone.argsort(dim=1), m.score_candidates(inputs, candidates).argsort(dim=1))
    assert m.gate is not None and not isinstance(m.gate, probe.ConstantGate)  # restored


def test_constant_weights_share_the_rest_among_the_available_branches():
    probe = _probe_module()
    available = torch.tensor([True, True, False, True])
    assert torch.allclose(probe.constant_weights(available, 1, 0.3), torch.tensor([0.35, 0.3, 0.0, 0.35]))
    assert torch.equal(probe.constant_weights(available, 0, 1.0), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    alone = torch.tensor([False, True, False])
    assert torch.equal(probe.constant_weights(alone, 1, 1.0), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="only the own branch"):
        probe.constant_weights(alone, 1, 0.5)  # nothing else could take the other half


def test_the_tuned_weight_is_chosen_on_validation_not_test():
    probe = _probe_module()
    tried = {0.0: (10.0, 30.0), 0.5: (12.0, 11.0), 1.0: (12.0, 20.0)}  # (valid, test)
    assert probe.tuned_on_validation(tried) == 0.5  # best valid, first of the tie; not 0.0's test
