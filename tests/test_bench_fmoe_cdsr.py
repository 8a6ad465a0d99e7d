"""The FMoE-CDSR replication benchmark end to end on a tiny FedDCSR-format fixture."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "bench_fmoe_cdsr.py"
OPTIONS = ["--data", "fkcb", "--rounds", "2", "--embed-dim", "8", "--max-len", "8", "--negatives", "20", "--threads", "1"]


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


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


def test_bench_refuses_options_it_cannot_honour(fkcb_like, tmp_path):
    for extra, message in ((["--jobs", "0"], "--jobs"), (["--compression", "fp16"], "compression"), (["--only", "fedavg"], "unknown methods")):
        done = _bench(*OPTIONS, "--data-root", str(fkcb_like), *extra, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr
