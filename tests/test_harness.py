"""The benchmark harness: common flags, variants x seeds with finished runs read back and
other settings rerun, the row schema, and the writer with its rerun command."""

import argparse
import json
from pathlib import Path

import pytest

import p2pmoe.harness.runs as runs
from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.harness import (
    RunResult,
    Variant,
    add_flags,
    bench_parser,
    by_label,
    chosen,
    failed_row,
    finished_summary,
    markdown,
    parse_flags,
    partial_summary,
    rerun_command,
    result_row,
    run_seeds,
    seed_list,
    upgraded,
    write_results,
    write_seed_tables,
)
from p2pmoe.tasks.base import Selection

needs_fmnist = pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")


def _parser(*names, **defaults):
    parser = bench_parser("a benchmark")
    parser.prog = "bench_x.py"
    parser.add_argument("--settings", default="c")
    add_flags(parser, *names, **defaults)
    return parser


def test_common_flags_parse_with_their_shared_defaults_and_a_script_s_own():
    parser = _parser("seeds", "only", "threads", "jobs", "name", "report_only", "first_rounds", "checkpoint_every", "resume", name="mine")
    args = parse_flags(parser, [])
    assert (args.seeds, args.only, args.threads, args.jobs, args.name) == ("0,1,2", "", 1, 1, "mine")
    assert (args.report_only, args.first_rounds, args.checkpoint_every, args.resume) == (False, 0, 0, False)
    args = parse_flags(parser, ["--seeds", "3,5", "--report-only", "--first-rounds", "2", "--checkpoint-every", "10", "--jobs", "2"])
    assert seed_list(args) == [3, 5] and args.first_rounds == 2 and args.checkpoint_every == 10 and args.jobs == 2
    with pytest.raises(ValueError, match="no common flags"):
        add_flags(parser, "sedes")


@pytest.mark.parametrize("argv", [["--jobs", "0"], ["--checkpoint-every", "-1"], ["--first-rounds", "2"]])
def test_values_no_benchmark_can_use_are_the_parser_s_error(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_flags(_parser("jobs", "checkpoint_every", "report_only", "first_rounds"), argv)
    assert stopped.value.code == 2 and argv[0] in capsys.readouterr().err


def test_only_picks_labels_numbers_or_parts_in_the_script_s_order(capsys):
    parser, known = _parser("only"), ["local", "fedavg 10%", "fedmoe-da (frozen φ)"]
    assert chosen(parser, parse_flags(parser, []), known) == known
    assert chosen(parser, parse_flags(parser, ["--only", "fedmoe-da (frozen φ),1"]), known) == ["local", "fedmoe-da (frozen φ)"]
    assert chosen(parser, parse_flags(parser, ["--only", "frozen,fedavg"]), known, parts=True) == ["fedavg 10%", "fedmoe-da (frozen φ)"]
    with pytest.raises(SystemExit):
        chosen(parser, parse_flags(parser, ["--only", "frozen"]), known)  # a part of a label counts only with parts
    assert "unknown variants ['frozen']" in capsys.readouterr().err


def test_the_rerun_command_is_the_given_flags_with_fixed_values_and_no_skipped_ones():
    parser = _parser("seeds", "only", "checkpoint_every", "report_only", "name", name="x")
    args = parse_flags(parser, ["--settings", "a,c", "--only", "fedavg 10%", "--report-only"])
    assert rerun_command(parser, args) == "python bench/bench_x.py --settings a,c --seeds 0,1,2 --only 'fedavg 10%' --checkpoint-every 0 --report-only --name x"
    line = rerun_command(parser, args, ("only", "report_only", "name"), checkpoint_every=5)
    assert line == "python bench/bench_x.py --settings a,c --seeds 0,1,2 --checkpoint-every 5"


def test_the_writer_leaves_json_markdown_and_figures_and_says_the_command(tmp_path, capsys):
    drawn = []

    def figure(folder, name):
        drawn.append((folder, name))
        (folder / name).write_bytes(b"png")

    text = markdown("A benchmark", "Setting in words.", "python bench/bench_x.py --seeds 0", "## a\n", "## b\n")
    write_results(tmp_path / "out", "x", {"rows": [1, 2]}, text, {"x_a.png": figure})
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"rows": [1, 2]}
    written = (tmp_path / "out" / "x.md").read_text()
    assert written == "# A benchmark\n\nSetting in words.\n\nCommand: `python bench/bench_x.py --seeds 0`\n\n## a\n\n## b\n"
    assert drawn == [(tmp_path / "out", "x_a.png")] and (tmp_path / "out" / "x_a.png").read_bytes() == b"png"
    assert written in capsys.readouterr().out
    write_results(tmp_path / "out", "quiet", [], "text", echo=False)
    assert capsys.readouterr().out == ""


def test_seed_tables_are_written_with_the_setting_and_a_rerun_command_without_run_only_flags(tmp_path, capsys):
    parser = _parser("seeds", "threads", "name", "results", name="x")
    args = parse_flags(parser, ["--seeds", "0,1", "--threads", "2", "--results", str(tmp_path)])
    doc = "Title line.\n\n    python bench/bench_x.py\n\nThe setting."
    write_seed_tables(parser, args, "X", doc, {"first": [{"method": "a", "accuracy": 0.5}], "empty": []})
    written = (tmp_path / "x.md").read_text()
    assert written.startswith("# X\n\npython bench/bench_x.py\n\nThe setting.\n\nCommand: `python bench/bench_x.py --settings c --seeds 0,1`")
    assert "## first" in written and "0.5" in written and "## empty" not in written and "--threads" not in written
    assert json.loads((tmp_path / "x.json").read_text())["seeds"] == [0, 1]
    other = parse_flags(parser, ["--seeds", "0,1", "--name", "probe", "--results", str(tmp_path)])
    write_seed_tables(parser, other, "X", doc, {"first": [{"method": "a", "accuracy": 0.5}]})
    assert "--seeds 0,1 --name probe`" in (tmp_path / "probe.md").read_text()  # its own run folders: a rerun needs the name
    capsys.readouterr()


def _fake_summary(cfg, accuracy):
    return {
        "method": cfg.run.method,
        "data": cfg.run.data,
        "metrics": {"accuracy": accuracy},
        "per_node": {"node-00": {"accuracy": accuracy}, "node-01": {"accuracy": accuracy}},
        "bytes": {"total": 10, "per_node_per_round": {"total": 5}},
        "wall_seconds": 1.5,
        "selection": {"key": None, "round": 0},
        "setting": cfg.to_dict(),
    }


def test_a_finished_run_is_read_back_and_not_run_again(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, **kwargs):
        calls.append((cfg.run.method, cfg.run.seed, kwargs["checkpoint_every"]))
        summary = _fake_summary(cfg, 0.5)
        Path(cfg.run.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.out) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(runs, "run_simulation", fake)
    base, variants = default_config(nodes=2, rounds=1), [Variant("alone", "local"), Variant("fedavg 50%", "fedavg", run={"participation": 0.5})]
    assert run_seeds(base, variants, [0], tmp_path, only_finished=True) == []
    first = run_seeds(base, variants, [0, 1], tmp_path, checkpoint_every=5)
    assert calls == [("local", 0, 5), ("fedavg", 0, 5), ("local", 1, 5), ("fedavg", 1, 5)]
    assert [r.out for r in first[:2]] == [tmp_path / "alone" / "seed0", tmp_path / "fedavg_50_" / "seed0"]
    again = run_seeds(base, variants, [0, 1], tmp_path, checkpoint_every=5)
    assert len(calls) == 4 and [r.summary for r in again] == [r.summary for r in first]
    run_seeds(with_options(base, rounds=2), variants[:1], [0], tmp_path)  # another setting, same folder: run again
    assert calls[-1] == ("local", 0, 0)


def test_runs_are_grouped_by_label_and_seed_through_an_optional_view(tmp_path):
    results = [RunResult("a", 0, tmp_path, {"m": 1}), RunResult("b", 0, tmp_path, {"m": 2}), RunResult("a", 2, tmp_path, {"m": 3})]
    assert by_label(results) == {"a": {0: {"m": 1}, 2: {"m": 3}}, "b": {0: {"m": 2}}}
    assert by_label(results, lambda r: {"seed": r.seed})["a"] == {0: {"seed": 0}, 2: {"seed": 2}}


def test_run_seeds_refuses_no_jobs_and_labels_that_share_a_folder(tmp_path):
    base = default_config(nodes=2, rounds=1)
    with pytest.raises(ValueError, match="at least 1"):
        run_seeds(base, [Variant("alone", "local")], [0], tmp_path, jobs=0)
    with pytest.raises(ValueError, match="share a folder"):
        run_seeds(base, [Variant("fedavg 50%", "fedavg"), Variant("fedavg 50_", "fedavg")], [0], tmp_path)
    assert seed_list(argparse.Namespace(seeds="0,1,0,2,1")) == [0, 1, 2]


def test_the_row_schema_for_a_run_a_domain_run_and_a_failure():
    cfg = default_config(method="local", nodes=2, rounds=1, seed=3)
    row = result_row({**_fake_summary(cfg, 0.25), "cpu_seconds": 2.0}, "alone", case="b", compute={"per_node_per_round": 4})
    assert {k: row[k] for k in ("method", "variant", "case", "seed", "selected_round", "wall_seconds", "cpu_seconds")} == {
        "method": "local",
        "variant": "alone",
        "case": "b",
        "seed": 3,
        "selected_round": 0,
        "wall_seconds": 1.5,
        "cpu_seconds": 2.0,
    }
    assert row["per_node"]["node-01"] == {"accuracy": 0.25} and row["compute"] == {"per_node_per_round": 4} and row["setting"] == cfg.to_dict()
    by_domain = result_row(_fake_summary(cfg, 0.25), "alone", domains=["Food", "Kitchen"])
    assert by_domain["per_domain"] == {"Food": {"accuracy": 0.25}, "Kitchen": {"accuracy": 0.25}} and "per_node" not in by_domain
    failed = failed_row("alone", cfg, RuntimeError("out of memory"))
    assert failed["error"] == "out of memory" and failed["seed"] == 3 and failed["method"] == "local"
    assert upgraded({"label": "x", "selection_round": 4, "cpu_min": 1.5}) == {"variant": "x", "selected_round": 4, "cpu_min": 1.5, "cpu_seconds": 90.0}


def test_a_stopped_run_is_read_over_the_rounds_every_client_logged(tmp_path):
    cfg = default_config(nodes=2, rounds=5, out=str(tmp_path))
    lines = [{"round": r, "node": n, "metrics": {"accuracy": 0.1 * r}} for r in range(3) for n in ("node-00", "node-01") if (r, n) != (2, "node-01")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    found = partial_summary(cfg, ["node-00", "node-01"], Selection("accuracy"))
    assert found["rounds_done"] == 2 and found["selection"]["round"] == 1 and found["metrics"]["accuracy"] == pytest.approx(0.1)
    capped = partial_summary(cfg, ["node-00", "node-01"], Selection("accuracy"), first_rounds=1)
    assert capped["rounds_done"] == 1 and capped["first_rounds"] == 1 and capped["selection"]["round"] == 0
    assert partial_summary(default_config(out=str(tmp_path / "none")), ["node-00"], Selection()) is None


@needs_fmnist
@pytest.mark.slow
def test_finished_runs_are_read_back_and_only_the_missing_ones_run(tmp_path, monkeypatch):
    calls = []
    real = runs.run_simulation

    def counted(cfg, **kwargs):
        calls.append((cfg.run.method, cfg.run.seed))
        return real(cfg, **kwargs)

    monkeypatch.setattr(runs, "run_simulation", counted)
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

    parallel = run_seeds(base, variants, [0, 1], tmp_path / "parallel", jobs=2)  # spawned workers: the same runs, the same order
    assert [(r.label, r.seed, r.summary["metrics"]) for r in parallel] == [(r.label, r.seed, r.summary["metrics"]) for r in first]
    assert len(calls) == 5  # the workers ran them, not this process


def test_a_torn_summary_is_not_a_finished_run(tmp_path):
    cfg = default_config(out=str(tmp_path))
    (tmp_path / "summary.json").write_text('{"setting": ')
    assert finished_summary(tmp_path, cfg) is None
