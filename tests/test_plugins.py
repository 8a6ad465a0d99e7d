"""A user's own method without touching the package: a .py file named by the run, or an
installed distribution's entry point."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.data.images import FMNIST_ROOT
from p2pmoe.methods.registry import NoOptions
from p2pmoe.options import option
from p2pmoe.plugins import PluginError, load_plugins

EXAMPLE = Path(__file__).parent.parent / "examples" / "median_fedavg.py"


@pytest.fixture(autouse=True)
def _registry_as_it_was(monkeypatch):
    """A plugin loaded here is gone afterwards: later tests (the generated docs) see the built-ins only."""
    from p2pmoe.methods import registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry.all_methods()))
    monkeypatch.delitem(sys.modules, "p2pmoe_plugin_median_fedavg", raising=False)


def test_the_example_method_aggregates_by_the_coordinate_wise_median():
    load_plugins(str(EXAMPLE))
    median_server = sys.modules["p2pmoe_plugin_median_fedavg"].MedianServer
    server = median_server("server", ["a", "b", "c"], {"w": torch.zeros(2)})
    states = [{"w": torch.tensor([1.0, -5.0])}, {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([100.0, 1.0])}]
    assert torch.equal(server.aggregate(states, [1, 1, 1000])["w"], torch.tensor([2.0, 0.0]))  # counts do not matter


@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_a_plugin_file_named_by_the_run_trains_like_any_method(tmp_path):
    from p2pmoe.sim.runner import run_simulation

    def run(method: str, plugins: str = "") -> dict:
        cfg = default_config(method=method, plugins=plugins, data="fmnist", nodes=3, rounds=2, max_train_per_node=100, threads=1, out=str(tmp_path / method))
        return run_simulation(with_options(cfg, task_options={"global_test_size": 100}), progress=False, report=False)

    median, mean = run("fedavg-median", str(EXAMPLE)), run("fedavg")
    assert median["method"] == "fedavg-median" and median["bytes"] == mean["bytes"]  # FedAvg's messages, another rule
    assert median["per_node"] != mean["per_node"]


def test_an_entry_point_of_an_installed_distribution_is_listed_with_the_built_ins(tmp_path):
    site = tmp_path / "site"
    (site / "my_rule-0.1.dist-info").mkdir(parents=True)
    (site / "my_rule-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rule\nVersion: 0.1\n")
    (site / "my_rule-0.1.dist-info" / "entry_points.txt").write_text("[p2pmoe.methods]\nmy-rule = my_rule_plugin\n")
    (site / "my_rule_plugin.py").write_text(EXAMPLE.read_text().replace('"fedavg-median"', '"my-rule"'))
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-m", "p2pmoe.cli", "methods"], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "my-rule" in listed.stdout and "fedavg" in listed.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "p2pmoe.cli", "simulate", "--method", "my-rule", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert helped.returncode == 0 and "my-rule" in helped.stdout


def test_a_missing_or_broken_plugin_is_an_error_that_names_it(tmp_path):
    with pytest.raises(PluginError, match="nowhere.py: no such file"):
        load_plugins(str(tmp_path / "nowhere.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('my bug')\n")
    with pytest.raises(PluginError, match="broken.py: RuntimeError: my bug"):
        load_plugins(str(broken))
    with pytest.raises(ValueError, match="plugin no_such_module_anywhere"):
        default_config(plugins="no_such_module_anywhere")


def test_methods_run_on_every_family_that_provides_what_they_need(monkeypatch):
    """Issue 27 item 1: a new family declares capabilities; no method's file lists it."""
    from p2pmoe.methods.registry import MethodSpec, get_method, methods_for
    from p2pmoe.tasks import base

    monkeypatch.setattr(base, "_TASKS", dict(base.all_tasks()))
    image = base.task_for_data("fmnist")

    class Tabular(type(image)):  # a user's own family: another data set, whole models
        name = "tabular"
        data = ("my-table",)
        provides = frozenset({"whole_model"})

    base.register_task(Tabular())
    assert {"local", "fedavg", "fedavg-ft", "gossip"} <= set(methods_for("tabular"))
    assert not {"fedmoe-da", "fmoe-cdsr", "pf-msmtrec"} & set(methods_for("tabular"))  # they need what it does not provide
    with pytest.raises(ValueError, match="does not run on tabular data"):
        get_method("fedmoe-da", "tabular")
    with pytest.raises(ValueError, match="unknown capabilities"):
        MethodSpec("x", "x", frozenset({"telepathy"}), build_client=lambda ctx, node: None)  # type: ignore[arg-type,return-value]

    class Odd(Tabular):
        name, data, provides = "odd", ("odd",), frozenset({"gpu"})

    with pytest.raises(ValueError, match="unknown capabilities"):
        base.register_task(Odd())


@dataclass(frozen=True)
class Clashing(NoOptions):
    """Options of a method whose `rounds` would shadow `[run] rounds` on the command line."""

    section: ClassVar[str] = "method"
    rounds: int = option(3, "shadows [run] rounds")


def test_a_method_flag_that_collides_with_a_common_or_task_flag_is_refused_at_registration():
    from p2pmoe.methods.registry import MethodSpec, register_method

    spec = MethodSpec("clash", "x", frozenset(), build_client=lambda ctx, node: None, options=Clashing)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"--rounds \(also an option of \[run\]\)"):
        register_method(spec)
    register_method(MethodSpec("no-clash", "x", frozenset(), build_client=lambda ctx, node: None, options=Clashing, flag_prefix="clash"))  # type: ignore[arg-type,return-value]
