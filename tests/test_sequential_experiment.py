"""Cross-domain sequential recommendation runs end to end on a small FedDCSR-format fixture."""

import json
import os
from pathlib import Path

import pytest
from conftest import FIXTURE_DOMAINS as DOMAINS

from p2pmoe.cli import main
from p2pmoe.config import default_config, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.tasks.sequential import FKCB_ENV


def _run(root: Path, method: str, out: Path) -> dict:
    code = main(
        [
            "simulate",
            "--data",
            "fkcb",
            "--data-root",
            str(root),
            "--method",
            method,
            "--rounds",
            "2",
            "--embed-dim",
            "8",
            "--max-len",
            "8",
            "--batch-size",
            "32",
            "--negatives",
            "20",
            "--local-epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    return json.loads((out / "summary.json").read_text())


# the default suite runs one server-mediated method, FMoE-CDSR and the baseline; the ablations are slow
@pytest.mark.parametrize(
    "method", ["local", "fmoe-cdsr", *(pytest.param(m, marks=pytest.mark.slow) for m in ("fedsasrec", "fmoe-cdsr-uniform", "fmoe-cdsr-unfrozen"))]
)
def test_every_method_runs_one_client_per_domain_with_ranking_metrics(fkcb_like, tmp_path, method):
    summary = _run(fkcb_like, method, tmp_path / method)
    assert summary["nodes"] == len(DOMAINS)  # one client per domain, whatever --nodes said
    for name in ("mrr", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "valid_mrr"):
        assert 0.0 <= summary["metrics"][name] <= 1.0
    assert summary["selection"]["key"] == "valid_mrr" and summary["selection"]["round"] in (0, 1)
    assert not set(summary["metrics"]) & {"ce", "kl", "kl_weight", "train_loss"}  # training statistics stay apart
    assert set(summary["per_node"]) == {"node-00", "node-01", "node-02"}
    kinds = set(summary["bytes"]["by_kind"])
    assert kinds == {"local": set(), "fedsasrec": {"model_update", "model_global"}}.get(method, {"model_update", "model_global"})


def test_fmoe_cdsr_client_uploads_one_expert_and_downloads_the_others(fkcb_like, tmp_path):
    _run(fkcb_like, "fmoe-cdsr", tmp_path / "f")
    import csv

    with open(tmp_path / "f" / "ledger.csv") as handle:
        rows = list(csv.DictReader(handle))
    uploads = [r for r in rows if r["kind"] == "model_update"]
    downloads = [r for r in rows if r["kind"] == "model_global"]
    assert len(uploads) == len(downloads) == 2 * len(DOMAINS)
    one = int(uploads[0]["payload_bytes"])
    assert all(int(r["payload_bytes"]) == one for r in uploads)
    # Round 0's reply already carries every other domain's expert: K - 1 of them.
    assert all(int(r["payload_bytes"]) == (len(DOMAINS) - 1) * one for r in downloads)


@pytest.mark.parametrize("encoder, pooling", [("vae", "sequence"), ("lean", "batch")])
def test_fmoe_cdsr_encoder_and_gate_pooling_come_from_the_config(fkcb_like, encoder, pooling):
    cfg = with_options(
        default_config(method="fmoe-cdsr", data="fkcb", data_root=str(fkcb_like)),
        task_options={"embed_dim": 8, "max_len": 8, "negatives": 20},
        method_options={"encoder": encoder, "gate_pooling": pooling},
    )
    model = build_experiment(resolve_experiment(cfg), only="node-00").nodes["node-00"].learner.model
    assert all((expert.logvar is not None) == (encoder == "vae") for expert in model.experts)
    assert model.gate_pooling == pooling and model.vae == (encoder == "vae")


def test_unknown_fmoe_options_are_refused(fkcb_like):
    cfg = default_config(method="fmoe-cdsr", data="fkcb", data_root=str(fkcb_like))
    with pytest.raises(ValueError, match=r"\[method\] encoder must be one of \['lean', 'vae'\]"):
        with_options(cfg, method_options={"encoder": "vea"})
    with pytest.raises(ValueError, match="gate_pooling"):
        with_options(cfg, method_options={"gate_pooling": "mean"})


def test_a_coordinator_reads_no_client_data(fkcb_like, monkeypatch):
    """The server builds its weight template from the model factory alone, with the shapes
    the clients' experts really have."""
    import p2pmoe.tasks.sequential as sequential

    cfg = with_options(default_config(method="fmoe-cdsr", data="fkcb", data_root=str(fkcb_like)), task_options={"embed_dim": 8, "max_len": 8, "negatives": 20})
    with monkeypatch.context() as patch:
        patch.setattr(sequential, "sequence_domains", lambda *a: pytest.fail("the coordinator loaded client data"))
        server = build_experiment(resolve_experiment(cfg), only="server").nodes["server"]
    client = build_experiment(resolve_experiment(cfg), only="node-01").nodes["node-01"]
    expert = client.model.expert_state(1)
    assert {k: v.shape for k, v in server.template.items()} == {k: v.shape for k, v in expert.items()}


def test_missing_fkcb_path_says_how_to_point_at_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(FKCB_ENV, raising=False)
    assert main(["simulate", "--data", "fkcb", "--method", "local", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--data-root" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(FKCB_ENV), reason=f"set {FKCB_ENV} to the FKCB folder")
def test_real_fkcb_smoke(tmp_path):
    summary = _run(Path(os.environ[FKCB_ENV]), "fmoe-cdsr", tmp_path / "real")
    assert summary["nodes"] == 4 and summary["metrics"]["mrr"] > 0
