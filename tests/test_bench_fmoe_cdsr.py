"""The FMoE-CDSR replication benchmark end to end on a tiny FedDCSR-format fixture."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "bench_fmoe_cdsr.py"


def test_bench_writes_a_row_per_method_and_checks_expert_bytes(fkcb_like, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench_fmoe_cdsr.py", "--data", "fkcb", "--data-root", str(fkcb_like), "--rounds", "2", "--embed-dim", "8",
            "--max-len", "8", "--negatives", "20", "--threads", "1", "--jobs", "1", "--only", "local,fmoe-cdsr",
            "--name", "t", "--results", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH), run_name="__main__")
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["method"] for r in rows] == ["local", "fmoe-cdsr"]
    for row in rows:
        assert {"method", "data", "metrics", "bytes", "setting"} <= set(row)
        assert 0 < row["metrics"]["mrr"] <= 1 and set(row["per_domain"]) == {"Alpha", "Beta", "Gamma"}
    local, fmoe = rows
    assert local["bytes"]["total"] == 0
    # last round: each of the 3 clients uploads its own expert and downloads the other two
    up = {node: t["up"] for node, t in fmoe["last_round_payload_bytes"].items()}
    down = {node: t["down"] for node, t in fmoe["last_round_payload_bytes"].items()}
    assert len(set(up.values())) == 1 and set(down.values()) == {2 * next(iter(up.values()))}
    text = (tmp_path / "t.md").read_text()
    assert "downloaded" in text and ": yes" in text and ": NO" not in text
    assert "paper: FedDCSR" in text
