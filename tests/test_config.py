import argparse

import pytest

from p2pmoe.config import RunConfig, add_config_arguments, config_from_args, load_toml


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "local"\nnodes = 4\nlr = 0.1\n')
    cfg = config_from_args(_parse(["--config", str(path), "--nodes", "6"]))
    assert (cfg.method, cfg.nodes, cfg.lr, cfg.rounds) == ("local", 6, 0.1, RunConfig().rounds)


def test_unknown_toml_key_is_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("nodse = 4\n")
    with pytest.raises(ValueError, match="nodse"):
        load_toml(path)


def test_wrong_types_and_ranges_are_explained(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('nodes = "many"\n')
    with pytest.raises(ValueError, match="nodes must be of type int"):
        load_toml(path)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        config_from_args(_parse(["--rounds", "0"]))
    with pytest.raises(ValueError, match="lr must be > 0"):
        config_from_args(_parse(["--lr", "-1"]))


def test_broken_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("nodes = = 3\n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        load_toml(path)
