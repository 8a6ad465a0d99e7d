"""The registry's variants: a pinned variant's builders always see its fixed options, and it
takes none of its own (issue 27: the silent fallback to default options is gone)."""

from __future__ import annotations

import dataclasses

import networkx as nx
import pytest

from p2pmoe.config import default_config
from p2pmoe.methods.fedecider import FeDeciderOptions
from p2pmoe.methods.pf_msmtrec import PFMSMTrecOptions
from p2pmoe.methods.registry import BuildContext, NoOptions, get_method
from p2pmoe.tasks.base import task_for_data


def _context(method: str, data: str) -> BuildContext:
    cfg = default_config(method=method, data=data)
    return BuildContext(cfg, task_for_data(data), ["node-00"], nx.empty_graph(["node-00"]), set())


def test_a_pinned_variant_builds_with_its_fixed_options_and_takes_none():
    seen = []
    base = dataclasses.replace(get_method("pf-msmtrec"), build_client=lambda ctx, node: seen.append(ctx.cfg.method))  # records what it is given
    fixed = PFMSMTrecOptions(template=False, prox=0.0)
    variant = base.variant("pinned", "a pinned baseline", fixed=fixed)
    assert variant.options is NoOptions and variant.flag_prefix == "" and variant.tasks == base.tasks
    variant.build_client(_context("pf-msmtrec", "ml-1m-mtl"), "node-00")
    assert seen == [fixed]  # not the run's options, not a default
    with pytest.raises(TypeError, match="fixed options must be PFMSMTrecOptions"):
        base.variant("bad", "x", fixed=FeDeciderOptions())


def test_registered_baselines_take_no_options_of_the_method_they_pin():
    assert get_method("fedbn-mmoe").options is NoOptions and get_method("pf-msmtrec").options is PFMSMTrecOptions
    assert get_method("lora-fedavg").options is NoOptions and get_method("fedecider").options is FeDeciderOptions
    assert get_method("fedbn-mmoe").build_client.__module__ == "p2pmoe.methods.pf_msmtrec"  # listed with its method


def test_a_pinned_context_shares_the_learners_built_through_it():
    """Review of issue 27: the copy a pinned variant builds through had its own learner cache,
    so fedbn-mmoe built every client's learner once per client."""
    ctx = _context("local", "fmnist")
    calls = []
    ctx.task = type("Counting", (), {"learners": lambda self, cfg, wanted, model: calls.append(wanted) or {0: "learner"}})()  # type: ignore[assignment]
    ctx.wanted = {"node-00"}
    pinned = ctx.with_method_options(NoOptions())
    assert pinned.learner("node-00") == "learner" and ctx.learner("node-00") == "learner"
    assert calls == [[0]]  # built once, for both
