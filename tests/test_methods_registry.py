"""The registry's variants and typed options (issue 27): a variant is data, pinned options are
filled in by the config and refused when a user sets them otherwise, and a builder receives
its method's options typed, once checked."""

from __future__ import annotations

import dataclasses
import re

import networkx as nx
import pytest

from p2pmoe.config import default_config, with_options
from p2pmoe.docs import methods_markdown
from p2pmoe.experiment import resolve_experiment
from p2pmoe.methods.fedecider import FeDeciderOptions
from p2pmoe.methods.fedmoe_da import FedMoEDAOptions
from p2pmoe.methods.pf_msmtrec import PFMSMTrecOptions
from p2pmoe.methods.registry import get_method
from p2pmoe.tasks.base import task_for_data


def test_a_variant_pins_its_options_in_the_config_and_builds_with_them():
    seen = []
    base = dataclasses.replace(get_method("pf-msmtrec"), build_client=lambda ctx, node: seen.append(ctx.options))  # records what it is given
    fixed = PFMSMTrecOptions(template=False, prox=0.0)
    variant = base.variant("pinned", "a pinned baseline", fixed=fixed)
    assert variant.own_options() == [] and variant.variant_of == "pf-msmtrec" and variant.tasks == base.tasks
    cfg = default_config(method="fedbn-mmoe", data="ml-1m-mtl")
    ctx = variant.context(cfg, task_for_data("ml-1m-mtl"), ["node-00"], nx.empty_graph(["node-00"]), set())
    variant.build_client(ctx, "node-00")
    assert isinstance(seen[0], PFMSMTrecOptions)
    with pytest.raises(TypeError, match="fixed options must be PFMSMTrecOptions"):
        base.variant("bad", "x", fixed=FeDeciderOptions())
    with pytest.raises(ValueError, match="unknown keys"):
        base.variant("bad", "x", fixed={"no_such_option": 1})


def test_the_config_of_a_variant_shows_what_ran_and_refuses_a_different_value():
    cfg = default_config(method="fmoe-cdsr-uniform", data="fkcb", data_root="unused")
    assert cfg.method.gate == "uniform" and cfg.method.freeze_foreign  # the summary and the hash say what ran
    with pytest.raises(ValueError, match=r"fmoe-cdsr-uniform.*gate = 'uniform'.*use method 'fmoe-cdsr'"):
        with_options(cfg, method_options={"gate": "learned"})
    with_options(cfg, method_options={"gate": "uniform", "head": "tied"})  # the same value and unpinned options are fine
    server = default_config(method="fedmoe-da-server")
    assert (server.method.planner, server.method.embedding) == ("server", "server")
    assert with_options(server, method="fedmoe-da").method.planner == "p2p"  # pinned values do not carry over to the base


def test_pinned_options_are_not_flags_and_the_docs_say_what_a_variant_fixes():
    import argparse

    from p2pmoe.config import add_experiment_arguments

    parser = argparse.ArgumentParser()
    add_experiment_arguments(parser, ["--method", "fmoe-cdsr-unfrozen", "--data", "fkcb"])
    text = parser.format_help()
    assert "--fmoe-head" in text and "--fmoe-freeze-foreign" not in text
    docs = methods_markdown()
    assert "A variant of `fmoe-cdsr` that fixes `freeze_foreign` = `False`." in docs
    assert re.search(r"### Method `lora-fedavg`[^#]*A variant of `fedecider` that fixes[^#]*`sharing` = `average`[^#]*No options of its own", docs)


def test_a_builder_gets_its_options_typed_and_a_config_of_another_method_is_refused():
    spec = get_method("fedmoe-da")
    resolved = resolve_experiment(default_config(method="fedmoe-da", nodes=2))
    ctx = spec.context(resolved.cfg, resolved.task, list(resolved.clients), resolved.graph, set())
    assert isinstance(ctx.options, FedMoEDAOptions) and ctx.options is resolved.cfg.method
    with pytest.raises(TypeError, match="method 'fedmoe-da' needs \\[method\\] options of type FedMoEDAOptions, got FedAvgOptions"):
        spec.options_of(default_config(method="fedavg"))


def test_server_planning_needs_the_server_embedding():
    with pytest.raises(ValueError, match="planner = 'server'.*embedding must be 'server'"):
        FedMoEDAOptions(planner="server")
    assert resolve_experiment(default_config(method="fedmoe-da-server", nodes=3)).has_server
    links = resolve_experiment(default_config(method="fedmoe-da-server", nodes=4, topology="ring")).links()
    assert links["node-00"] == ["node-01", "node-02", "node-03", "server"]  # a coordinator's plan may name anyone
