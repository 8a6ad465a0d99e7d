"""Issue 28: what a new user met on a cross-domain data set of their own (tests/fixtures/shop,
five product domains of very different sizes), one test or more per point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from p2pmoe.cli import main
from p2pmoe.config import default_config, with_options
from p2pmoe.data.errors import DataNotFoundError
from p2pmoe.data.sequences import DomainSequences
from p2pmoe.driver.summary import first_exchange_round, selection_warning
from p2pmoe.eval.metrics import random_ranking_metrics
from p2pmoe.eval.negatives import check_negatives_fit
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.ledger import ByteLedger
from p2pmoe.report import write_report
from p2pmoe.report.folders import load_run
from p2pmoe.report.tables import profile_lines, summary_tables
from p2pmoe.sim.bus import GlobalRNGUsed
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.base import task_for_data

SHOP = Path(__file__).parent / "fixtures" / "shop"
DOMAINS = ["Books", "Electronics", "Garden", "Sports", "Toys"]
SMALL = {"embed_dim": 8, "max_len": 8, "blocks": 1, "heads": 1}


def shop(method: str = "fmoe-cdsr", data: str = "atomic", negatives: int = 20, **run):
    return with_options(default_config(method=method, data=data, data_root=str(SHOP), **run), task_options={**SMALL, "negatives": negatives})


# 1. too many negatives: every short domain at once, and the remedy


def test_too_many_negatives_names_every_short_domain_and_the_value_that_fits():
    with pytest.raises(ValueError) as err:
        build_experiment(resolve_experiment(shop(negatives=999)))
    message = str(err.value)
    assert all(domain in message for domain in DOMAINS)  # all five are short of 999, not only the first
    assert "--negatives N" in message and "N <= 39" in message  # Sports has 40 items: 39 besides the target
    build_experiment(resolve_experiment(shop(negatives=39)))  # the value it suggests fits


def test_timelines_negatives_are_checked_over_every_node_and_domain():
    with pytest.raises(ValueError, match=r"do not fit 2 of 5 domains \(Sports allows 29, Garden allows 49\).*N <= 29"):
        build_experiment(resolve_experiment(shop("local", "atomic-timelines", 100, nodes=1)))
    build_experiment(resolve_experiment(shop("local", "atomic-timelines", 29, nodes=1)))


def test_check_negatives_fit_without_any_candidate_says_what_to_do():
    check_negatives_fit({"a": 5, "b": 9}, 5)
    with pytest.raises(ValueError, match="leave it out of the data"):
        check_negatives_fit({"a": 0, "b": 9}, 5)


# 2. help for a data set shows its family's options and the methods that run on it


def test_help_of_a_data_set_shows_its_options_and_methods(capsys):
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--data", "atomic", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--negatives" in out and "--domain-field" in out
    assert "methods that run on atomic (sequential data): fedsasrec, fmoe-cdsr" in " ".join(out.split())
    assert "error:" not in out


# 3. the default FMoE-CDSR expert ships only what is used


def test_default_fmoe_cdsr_experts_have_no_unused_sigma_stack():
    model = build_experiment(resolve_experiment(shop()), only="node-00").nodes["node-00"].learner.model
    assert all(expert.logvar is None for expert in model.experts) and not model.vae
    assert all(name.startswith("mu.") for name in model.expert_state(0))
    vae = build_experiment(resolve_experiment(with_options(shop(), method_options={"encoder": "vae"})), only="node-00").nodes["node-00"].learner.model
    count = lambda m: sum(t.numel() for t in m.expert_state(0).values())  # noqa: E731
    assert count(vae) == 2 * count(model) and vae.vae  # the KL term comes with the stack it needs


# 4. a selected round that precedes any exchange is flagged; rounds are numbered from 0


def test_selection_before_any_exchange_is_warned():
    ledger = ByteLedger()
    ledger.record(0, "node-00", "server", "expert_upload", 10, 100)
    assert first_exchange_round(ledger, ["node-00"]) is None  # sending is not receiving
    ledger.record(1, "server", "node-00", "expert_reply", 10, 100)
    ledger.record(2, "server", "node-00", "expert_reply", 10, 0)
    assert first_exchange_round(ledger, ["node-00"]) == 1
    assert "round 1" in selection_warning(1, 1) and "round 0" in selection_warning(0, 1)
    assert selection_warning(2, 1) is None and selection_warning(0, None) is None  # Local claims no exchange


def test_a_run_whose_selection_precedes_the_exchange_says_so(tmp_path, capsys):
    code = main(
        ["simulate", "--data", "atomic", "--data-root", str(SHOP), "--method", "fmoe-cdsr", "--rounds", "1", "--negatives", "20"]
        + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
        + ["--out", str(tmp_path), "--quiet", "--no-report"]
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["selection"]["round"] == 0 and summary["selection"]["first_exchange_round"] == 0
    assert "no node had yet trained on anything another node sent" in summary["selection"]["warning"]
    captured = capsys.readouterr()
    assert "selected round: 0" in captured.out and "warning: model selection picked round 0" in captured.err


# 5. cold-start targets and the random-ranking level


def test_random_ranking_level_is_the_expectation_over_uniform_ranks():
    level = random_ranking_metrics(100)
    assert level["mrr"] == pytest.approx(sum(1 / r for r in range(1, 101)) / 100)
    assert level["hr@10"] == pytest.approx(0.1) and level["hr@1"] == pytest.approx(0.01)
    assert level["ndcg@5"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 6)) / 100)


def test_sequential_profile_counts_targets_never_seen_in_training(monkeypatch):
    domain = DomainSequences("d", 6, train=[[0, 1, 2], [1, 2]], valid=[[0, 1, 2, 3], [1, 2, 0]], test=[[0, 1, 2, 3, 4], [1, 2, 0, 5]],
                             train_users=[0, 1], valid_users=[0, 1], test_users=[0, 1])  # fmt: skip
    monkeypatch.setattr("p2pmoe.tasks.sequential.sequence_domains", lambda *a: (domain,))
    cfg = shop()
    profile = task_for_data("atomic").profile(cfg)
    assert profile["unseen_targets"] == {"d": {"valid": 0.5, "test": 1.0}}
    assert profile["random_ranking"]["candidates"] == 21 and profile["random_ranking"]["mrr"] == random_ranking_metrics(21)["mrr"]
    lines = profile_lines(profile)
    assert "d valid 50%, test 100%" in lines[0] and "cold-start" in lines[1] and "21 candidates" in lines[2]


def test_fixture_profile_reaches_the_summary(tmp_path):
    summary = run_simulation(shop(rounds=1, out=str(tmp_path)), progress=False, report=False)
    unseen = summary["data_profile"]["unseen_targets"]
    assert set(unseen) == set(DOMAINS) and 0 < unseen["Books"]["test"] < 0.5 and unseen["Sports"]["test"] == 0.0
    assert summary["data_profile"]["random_ranking"]["candidates"] == 21


# 7. options a family does not use are refused, and the client count is not changed silently


def test_nodes_that_disagree_with_the_domains_are_refused():
    with pytest.raises(ValueError, match=r"one client per domain: its 5 domains \(Books, Electronics, Garden, Sports, Toys\) make 5 nodes.*nodes = 3"):
        build_experiment(resolve_experiment(shop(nodes=3)))
    assert build_experiment(resolve_experiment(shop(nodes=5))).cfg.run.nodes == 5


@pytest.mark.parametrize(
    "data, option, value", [("atomic-timelines", "partition", "shards:2"), ("atomic", "partition", "iid"), ("atomic", "max_train_per_node", 50)]
)
def test_run_options_a_family_ignores_are_refused(data, option, value):
    method = "local" if data == "atomic-timelines" else "fmoe-cdsr"
    with pytest.raises(ValueError, match=rf"\[run\] {option} = .* does not apply to .* data \({data}\)"):
        build_experiment(resolve_experiment(shop(method, data, **{option: value})))


# 8. a --data-root one level too high points at the folder that holds the files


def test_parent_data_root_suggests_the_sub_folder():
    with pytest.raises(DataNotFoundError, match=r"did you mean --data-root .*fixtures/shop\?"):
        build_experiment(resolve_experiment(with_options(shop(), data_root=str(SHOP.parent))))


def test_data_root_help_names_the_atomic_sets(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--data", "atomic", "--help"])
    assert "atomic-timelines files" in " ".join(capsys.readouterr().out.split())


# 9. workers with a model that draws from the global RNG: one line, before round 0


def test_workers_with_dropout_are_refused_before_any_round(tmp_path, capsys):
    with pytest.raises(GlobalRNGUsed, match="dropout in FMoECDSR.*--workers 1"):
        run_simulation(shop(workers=2, out=str(tmp_path)), progress=False, report=False)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the run folder was opened
    assert (
        main(["simulate", "--data", "atomic", "--data-root", str(SHOP), "--method", "fmoe-cdsr", "--negatives", "20", "--workers", "2", "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") <= 3 and "Traceback" not in err


# 11. clients are named by the domain they hold


def test_summary_and_metrics_name_each_clients_domain(tmp_path):
    summary = run_simulation(shop(rounds=1, out=str(tmp_path)), progress=False, report=False)
    assert summary["holds"] == {f"node-0{k}": d for k, d in enumerate(DOMAINS)}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {(r["node"], r["holds"]) for r in rows if r["node"] != "server"} == set(summary["holds"].items())
    assert all("holds" not in r for r in rows if r["node"] == "server")


def test_image_clients_are_anonymous():
    assert task_for_data("fmnist").client_names(default_config()) is None


# The report and the terminal say the same (points 4, 5, 7 and 11 where a person reads them)


def test_report_and_terminal_show_random_level_warning_domains_and_no_ignored_options(tmp_path, capsys):
    run = tmp_path / "fmoe"
    summary = run_simulation(shop(rounds=1, out=str(run)), progress=False, report=False)
    report = write_report([run], tmp_path / "report", echo=True)
    printed = capsys.readouterr()
    level = random_ranking_metrics(21)
    assert "random ranking (21 candidates)" in printed.out and f"{level['mrr']:.4f}" in printed.out  # beside the methods
    page = (tmp_path / "report" / "index.html").read_text()
    assert "random ranking (21 candidates)" in page and "targets never seen in training: Books" in page
    assert "warning: model selection picked round 0" in page  # one round: selected before any training on what arrived
    assert "dirichlet" not in page  # the family never read the partition: no caption names one
    assert any(name.startswith("gate_mean") for name in report.figures) and summary["holds"]["node-00"] == "Books"
    assert load_run(run).named("node-03") == "node-03 (Sports)"
    assert summary_tables([summary]).splitlines()[-1].lstrip().startswith("random ranking (21 candidates)")


def test_a_domain_name_with_a_slash_stays_whole_in_the_per_domain_table():
    from p2pmoe.report.tables import breakdown

    means = {"mrr", "auc"}
    assert breakdown("home/kitchen/mrr", means) == ("home/kitchen", "mrr") and breakdown("auc/click", means) == ("click", "auc")
