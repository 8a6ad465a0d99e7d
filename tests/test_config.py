"""Experiment configs: typed options, layered sources, generated flags and help."""

import argparse

import pytest

from p2pmoe.cli import build_parser
from p2pmoe.config import add_experiment_arguments, config_from_args, default_config, read_toml, with_options
from p2pmoe.methods.fedmoe_da import FedMoEDAOptions
from p2pmoe.settings import RunOptions, canonical_config, config_differences, config_hash


def _parse(argv, defaults=None):
    parser = argparse.ArgumentParser()
    add_experiment_arguments(parser, argv, defaults)
    return config_from_args(parser.parse_args(argv), defaults)


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nmethod = "local"\nnodes = 4\nlr = 0.1\n')
    cfg = _parse(["--config", str(path), "--nodes", "6"])
    assert (cfg.run.method, cfg.run.nodes, cfg.run.lr, cfg.run.rounds) == ("local", 6, 0.1, RunOptions().rounds)


def test_a_command_default_loses_to_the_toml_file_and_to_flags(tmp_path):
    """demo's own defaults (4 nodes) used to override `nodes` from --config."""
    defaults = {"run": {"nodes": 4, "rounds": 5}, "task": {}, "method": {}}
    path = tmp_path / "demo.toml"
    path.write_text("[run]\nnodes = 7\n")
    cfg = _parse(["--config", str(path)], defaults)
    assert (cfg.run.nodes, cfg.run.rounds) == (7, 5)
    assert _parse(["--config", str(path), "--rounds", "9"], defaults).run.rounds == 9


def test_demo_help_shows_the_defaults_demo_uses(capsys):
    with pytest.raises(SystemExit):
        build_parser(["demo", "--help"]).parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 4)" in text and "default 2000)" in text and "default ring)" in text


def test_method_options_come_from_the_method_table_and_prefixed_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nmethod = "fedmoe-da"\n[method]\np = 3\nembedding = "frozen"\n')
    cfg = _parse(["--config", str(path), "--fedmoe-tau", "0.5"])
    assert cfg.method == FedMoEDAOptions(p=3, tau=0.5, interval=1, embedding="frozen")


def test_help_lists_type_choices_default_and_meaning_of_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser(["simulate", "--method", "fedmoe-da", "--help"]).parse_args(["simulate", "--method", "fedmoe-da", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fedmoe-embedding" in text and "one of gossip, frozen, server" in text and "default gossip" in text
    assert "--experts" in text and "int, >= 1; <= 1024, default 4" in text
    assert "--rounds" in text and "communication rounds" in text


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[run]\nnodse = 4\n")
    with pytest.raises(ValueError, match=r"nodse.*valid keys"):
        _parse(["--config", str(path)])
    path.write_text("nodes = 4\n")
    with pytest.raises(ValueError, match=r"unknown keys or tables \['nodes'\]"):
        read_toml(path)
    path.write_text('[run]\nmethod = "fedmoe-da"\n[method]\nP = 2\n')
    with pytest.raises(ValueError, match=r"\[method\] has unknown keys \['P'\]"):
        _parse(["--config", str(path)])


@pytest.mark.parametrize(
    "toml, message",
    [
        ('rounds = "20"', r"\[run\] rounds must be a int, got '20'"),
        ("nodes = 2.5", r"\[run\] nodes must be a int, got 2.5"),
        ("nodes = true", r"\[run\] nodes must be a int, got True"),
        ('device = "tpu"', r"device must be one of \['auto', 'cpu', 'cuda'\]"),
        ("lr = -1", r"lr must be > 0"),
    ],
)
def test_toml_values_must_have_the_right_type_and_range(tmp_path, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(f"[run]\n{toml}\n")
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(path)])


def test_flag_values_are_converted_and_checked():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        _parse(["--rounds", "0"])
    with pytest.raises(ValueError, match="--rounds must be a int"):
        _parse(["--rounds", "many"])
    assert _parse(["--max-train-per-node", "none"]).run.max_train_per_node is None


def test_broken_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[run]\nnodes = = 3\n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        read_toml(path)


def test_a_method_on_the_wrong_task_family_is_refused():
    with pytest.raises(ValueError, match=r"does not run on sequential data; methods for sequential: \['fedsasrec', 'fmoe-cdsr'"):
        default_config(method="fedmoe-da", data="ml-1m")
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        default_config(method="fedprox")


def test_changing_the_method_resets_its_options():
    cfg = with_options(default_config(method="fedmoe-da"), method_options={"p": 3})
    assert cfg.method.p == 3
    assert with_options(cfg, method="fedavg").method.to_dict() == {"aggregation": "mean", "dp_clip": None, "dp_noise": 0.0}  # its own defaults, not P = 3


def test_config_hash_ignores_node_local_keys_and_names_differences():
    a = default_config(method="fedavg", out="runs/a", threads=2)
    b = default_config(method="fedavg", out="runs/b", threads=1, device="cpu", data_root="/elsewhere")
    assert config_hash(a) == config_hash(b)
    c = with_options(default_config(method="fedavg", seed=1), task_options={"experts": 8})
    assert config_hash(a) != config_hash(c)
    assert config_differences(canonical_config(a), canonical_config(c)) == ["run.seed: 0 here, 1 there", "task.experts: 4 here, 8 there"]
    assert config_differences(canonical_config(a), "garbage") == ["<whole config>"]


def test_the_demo_verdict_says_which_of_local_and_fedavg_fedmoe_da_beats():
    from p2pmoe.cli import demo_verdict

    def run(accuracy, global_accuracy, per_round=1000.0):
        return {"metrics": {"accuracy": accuracy, "global_accuracy": global_accuracy}, "bytes": {"per_node_per_round": {"total": per_round}}}

    line = demo_verdict(run(0.85, 0.70, 250.0), run(0.80, 0.78), run(0.84, 0.50))
    assert line.startswith("FedMoE-DA beat both Local and FedAvg") and "0.25x" in line and "0.850 against Local 0.840 and FedAvg 0.800" in line
    assert "beat FedAvg but NOT Local" in demo_verdict(run(0.83, 0.70, 250.0), run(0.80, 0.78), run(0.84, 0.50))
    assert "beat Local but NOT FedAvg" in demo_verdict(run(0.79, 0.70, 250.0), run(0.80, 0.78), run(0.70, 0.50))
    assert "beat NEITHER" in demo_verdict(run(0.60, 0.70, 250.0), run(0.80, 0.78), run(0.70, 0.50))


def test_hostile_sizes_are_refused_before_anything_is_allocated(tmp_path):
    """Issue 26 N10: a billion nodes, a heartbeat of a nanosecond, experts and widths of 1e5,
    and an oversized topology file are errors naming the key, not gigabytes of memory."""
    from p2pmoe.node.config import Timing
    from p2pmoe.topology import MAX_TOPOLOGY_BYTES, TopologyError, load_topology

    with pytest.raises(ValueError, match="nodes"):
        default_config(nodes=10**9)
    with pytest.raises(ValueError, match="heartbeat"):
        Timing(heartbeat=1e-9)
    for key in ("experts", "embed_dim", "expert_hidden"):
        with pytest.raises(ValueError, match=key):
            with_options(default_config(), task_options={key: 100_000})
    big = tmp_path / "huge.json"
    with big.open("wb") as handle:
        handle.truncate(MAX_TOPOLOGY_BYTES + 1)  # sparse: no disk, the size alone is refused
    with pytest.raises(TopologyError, match="limited to"):
        load_topology(big, 10)
