"""The FMoE-CDSR replication benchmark end to end on a tiny FedDCSR-format fixture."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pmoe.node.checkpoint import load_checkpoint

BENCH = Path(__file__).parent.parent / "bench" / "bench_fmoe_cdsr.py"
OPTIONS = ["--data", "fkcb", "--rounds", "2", "--embed-dim", "8", "--max-len", "8", "--negatives", "20", "--threads", "1"]


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bench_writes_a_row_per_method_and_checks_expert_bytes(fkcb_like, tmp_path):
    done = _bench(*OPTIONS, "--data-root", str(fkcb_like), "--jobs", "2", "--only", "local,fmoe-cdsr", "--name", "t", "--results", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["method"] for r in rows] == ["local", "fmoe-cdsr"]
    for row in rows:
        assert {"method", "data", "metrics", "bytes", "setting"} <= set(row)
        assert 0 < row["metrics"]["mrr"] <= 1 and set(row["per_domain"]) == {"Alpha", "Beta", "Gamma"}
    local, fmoe = rows
    assert local["bytes"]["total"] == 0 and local["payload_bytes_by_round"] == {}
    # every round: each of the 3 clients uploads its own expert and downloads the other two
    for by_node in fmoe["payload_bytes_by_round"].values():
        up = {t["up"] for t in by_node.values()}
        assert len(by_node) == 3 and len(up) == 1 and {t["down"] for t in by_node.values()} == {2 * up.pop()}
    text = (tmp_path / "t.md").read_text()
    assert "in each of the 2 rounds" in text and ": yes" in text and ": NO" not in text
    assert "paper: FedDCSR" in text
    assert "--data-root DIR" in text and str(fkcb_like) not in text  # no path of this machine


@pytest.mark.slow
def test_bench_refuses_options_it_cannot_honour(fkcb_like, tmp_path):
    for extra, message in ((["--jobs", "0"], "--jobs"), (["--compression", "fp16"], "compression"), (["--only", "fedavg"], "unknown variants")):
        done = _bench(*OPTIONS, "--data-root", str(fkcb_like), *extra, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr


@pytest.mark.slow
def test_report_only_tables_finished_and_stopped_runs_without_running(fkcb_like, tmp_path):
    """Runs done elsewhere (a GPU machine) come back as run folders: --report-only tables the
    finished ones from their summaries and one stopped early from the rounds all clients logged."""
    methods = "fmoe-cdsr,fmoe-cdsr-local,fmoe-cdsr-fedavg"
    done = _bench(*OPTIONS, "--data-root", str(fkcb_like), "--only", methods, "--name", "r", "--results", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert first["fmoe-cdsr-local"]["bytes"]["total"] == 0
    up = {t["up"] for by_node in first["fmoe-cdsr-fedavg"]["payload_bytes_by_round"].values() for t in by_node.values()}
    down = {t["down"] for by_node in first["fmoe-cdsr-fedavg"]["payload_bytes_by_round"].values() for t in by_node.values()}
    assert len(up) == 1 and up == down  # one expert up, the average of the experts down
    # cut fmoe-cdsr back to its first round, as a run stopped by a time limit leaves it
    folder = tmp_path / "runs" / "bench_r" / "fmoe-cdsr"
    (folder / "summary.json").unlink()
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["round"] == 0) + "\n")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    again = _bench(*OPTIONS, "--data-root", str(fkcb_like), "--only", methods, "--name", "r2", "--results", str(tmp_path), "--report-only", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    # the folders are named after --name, so r2 has nothing: every method is reported missing
    assert "nothing to report" in (tmp_path / "r2.md").read_text()
    again = _bench(*OPTIONS, "--data-root", str(fkcb_like), "--only", methods, "--name", "r", "--results", str(tmp_path), "--report-only", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")} == stamps  # nothing ran
    rows = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert rows["fmoe-cdsr"]["rounds_done"] == 1 and rows["fmoe-cdsr"]["selected_round"] == 0
    assert rows["fmoe-cdsr-local"]["metrics"] == first["fmoe-cdsr-local"]["metrics"]
    text = (tmp_path / "r.md").read_text()
    assert "FMoE-CDSR (stopped after 1 of 2 rounds)" in text and "--report-only" in text and "--report-only True" not in text
    assert "## FMoE-CDSR\n" in text  # the per-round gate table
    assert "- fmoe-cdsr: in each of the 1 rounds every client uploaded" in text  # the rounds it logged, checked
    # one budget for all: the finished runs read over their first round only, like the stopped one
    capped = _bench(
        *OPTIONS,
        "--data-root",
        str(fkcb_like),
        "--only",
        methods,
        "--name",
        "r",
        "--results",
        str(tmp_path),
        "--report-only",
        "--first-rounds",
        "1",
        cwd=tmp_path,
    )
    assert capped.returncode == 0, capped.stderr
    rows = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert {r["selected_round"] for r in rows.values()} == {0} and {r["rounds_done"] for r in rows.values()} == {1}
    assert "Local, FMoE-CDSR branch (first 1 of 2 rounds)" in (tmp_path / "r.md").read_text()
    refused = _bench(*OPTIONS, "--data-root", str(fkcb_like), "--first-rounds", "1", cwd=tmp_path)
    assert refused.returncode == 2 and "--report-only" in refused.stderr


@pytest.mark.slow
def test_checkpoint_every_lets_a_rerun_go_on_from_the_run_folder(fkcb_like, tmp_path):
    args = (*OPTIONS, "--data-root", str(fkcb_like), "--only", "local", "--name", "c", "--results", str(tmp_path), "--checkpoint-every", "1")
    first = _bench(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "no checkpoint" in first.stderr
    checkpoint = load_checkpoint(tmp_path / "runs" / "bench_c" / "local" / "checkpoint.safetensors")
    assert checkpoint is not None and checkpoint.round == 1
    again = _bench(*args, cwd=tmp_path)  # a finished run resumes to itself: nothing runs again
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and "after round 1 (rounds 0..1" in again.stderr
    rows = json.loads((tmp_path / "c.json").read_text())
    assert rows[0]["metrics"]["mrr"] > 0 and "--checkpoint-every" not in (tmp_path / "c.md").read_text()
