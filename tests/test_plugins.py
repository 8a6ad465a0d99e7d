"""A user's own method without touching the package: a .py file named by the run, or an
installed distribution's entry point."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
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


@pytest.mark.slow  # two fresh interpreters import torch
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
        MethodSpec("x", "x", frozenset({"telepathy"}), options=NoOptions, build_client=lambda ctx, node: None)  # type: ignore[arg-type,return-value]

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


OWN_MODEL = Path(__file__).parent.parent / "examples" / "own_moe_model.py"


def _csv_files(folder: Path) -> None:
    """A user's own data as files: 6 features, 4 classes around separate centres."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, (4, 6))
    folder.mkdir()
    for name, n in (("train", 600), ("test", 300)):
        y = rng.integers(0, 4, n)
        x = centres[y] + rng.normal(0, 1.5, (n, 6))
        lines = [",".join(f"f{i}" for i in range(6)) + ",label"] + [",".join(f"{v:.4f}" for v in row) + f",{c}" for row, c in zip(x, y, strict=True)]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")


def test_a_users_own_moe_model_and_data_train_under_fedmoe_da(tmp_path, monkeypatch):
    """Issue 27 example (b): the user's model (their experts, their gate) and CSV files, from
    one file outside the package; FedMoE-DA selects, fetches and aggregates their experts."""
    from p2pmoe.experiment import build_experiment, resolve_experiment
    from p2pmoe.runs import read_ledger
    from p2pmoe.sim.runner import run_simulation
    from p2pmoe.tasks import base

    monkeypatch.setattr(base, "_TASKS", dict(base.all_tasks()))
    monkeypatch.delitem(sys.modules, "p2pmoe_plugin_own_moe_model", raising=False)
    _csv_files(tmp_path / "data")
    cfg = default_config(
        method="fedmoe-da", plugins=str(OWN_MODEL), data="my-csv", data_root=str(tmp_path / "data"), nodes=4, rounds=3, out=str(tmp_path / "run")
    )
    model = build_experiment(resolve_experiment(cfg)).nodes["node-00"].learner.model
    assert type(model).__module__ == "p2pmoe_plugin_own_moe_model" and type(model.moe).__name__ == "MyMoE"
    summary = run_simulation(cfg, progress=False, report=False)
    kinds = {e.kind for e in read_ledger(tmp_path / "run" / "ledger.csv")}
    assert {"gate_publish", "expert_request", "expert_response", "embedding"} <= kinds
    assert summary["metrics"]["accuracy"] > 0.5  # four classes: chance is about 0.25
    assert not any(name.startswith("p2pmoe_plugin") for name in vars(base))  # the package imports nothing of it


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_a_plugin_method_runs_in_a_swarm_of_daemons(tmp_path):
    """Example (a) in real daemon processes: `[run] plugins` travels in every node's file."""
    from p2pmoe.experiment import resolve_experiment
    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import run_swarm

    cfg = default_config(method="fedavg-median", plugins=str(EXAMPLE), data="fmnist", nodes=2, rounds=2, max_train_per_node=100, out=str(tmp_path))
    summary = run_swarm(
        resolve_experiment(with_options(cfg, task_options={"global_test_size": 100})),
        Timing(round_deadline=60, startup=60, linger=2),
        timeout=240,
        progress=False,
        report=False,
    )
    assert summary["method"] == "fedavg-median" and summary["nodes_finished"] == ["node-00", "node-01"]
    assert set(summary["exit_codes"].values()) == {0}


def test_a_task_option_that_shadows_a_run_flag_is_refused_at_registration(monkeypatch):
    from p2pmoe.tasks import base

    monkeypatch.setattr(base, "_TASKS", dict(base.all_tasks()))
    image = base.task_for_data("fmnist")

    class Shadowing(type(image)):  # type: ignore[misc]
        name, data, options = "shadow", ("shadow",), Clashing  # Clashing has `rounds`, a [run] option

    with pytest.raises(ValueError, match=r"flags \['--rounds'\] are also \[run\] options"):
        base.register_task(Shadowing())
