"""FMoE-CDSR's branch choice over seeds, end to end on a tiny FedDCSR-format fixture."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "bench_fmoe_cdsr_seeds.py"


@pytest.mark.slow
def test_both_branches_and_a_baseline_over_three_seeds_give_a_paired_table_by_domain(fkcb_like, tmp_path):
    argv = ["--data", "fkcb", "--data-root", str(fkcb_like), "--rounds", "1", "--embed-dim", "8", "--negatives", "20", "--seeds", "0,1,2"]
    command = [sys.executable, str(BENCH), *argv, "--only", "1,2,3", "--name", "t", "--results", str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    tables = json.loads((tmp_path / "t.json").read_text())
    rows = {r["method"]: r for r in next(iter(tables["tables"].values()))}
    tied, local = rows["FMoE-CDSR, tied head, no graph layer"], rows["Local SASRec"]
    assert rows["FMoE-CDSR, specified branch"]["seeds"] == 3 and tied["seeds"] == 3
    assert "verdict" in tied and "± se" in local  # each row paired with the specified branch
    assert {"Alpha/mrr", "Beta/mrr", "Gamma/mrr"} <= set(tied) and all(0 < tied[f"{d}/mrr"] <= 1 for d in ("Alpha", "Beta", "Gamma"))
    assert rows["random ranking (21 candidates)"]["mrr"] < 0.2
    assert len({(r["variant"], r["seed"]) for r in tables["rows"]}) == 9  # one row per run, with its seed and domains
    assert all(set(r["per_domain"]) == {"Alpha", "Beta", "Gamma"} for r in tables["rows"])
    assert (tmp_path / "t.png").is_file() and str(fkcb_like) not in (tmp_path / "t.md").read_text()
