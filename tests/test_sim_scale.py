"""Accounting-only runs (`--train none`) and simulated compute time."""

from __future__ import annotations

import csv
import json

import pytest

from p2pmoe.config import default_config, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.methods.fedmoe_da import expert_tensors
from p2pmoe.methods.registry import run_participation
from p2pmoe.sim.runner import compute_seconds, run_simulation
from p2pmoe.wire.codec import encode, frame_sizes
from p2pmoe.wire.messages import Message, MessageKind


def _accounting(tmp_path, nodes=24, **run):
    cfg = default_config(method="fedmoe-da", nodes=nodes, rounds=2, topology="random-regular:4", train="none", out=str(tmp_path), **run)
    return with_options(cfg, method_options={"embedding": "frozen"})


def test_accounting_nodes_share_one_model_but_each_has_its_own_gate(tmp_path):
    nodes = build_experiment(resolve_experiment(_accounting(tmp_path))).nodes
    models = [node.learner.model for node in nodes.values()]
    assert len({m.embedder.layers[0].weight.data_ptr() if hasattr(m.embedder, "layers") else next(m.embedder.parameters()).data_ptr() for m in models}) == 1
    assert len({m.moe.experts[0].linears[0].weight.data_ptr() for m in models}) == 1
    assert len({m.moe.gate.proj.weight.data_ptr() for m in models}) == len(models)


def test_an_accounting_run_counts_real_message_sizes_without_training_or_evaluating(tmp_path):
    summary = run_simulation(_accounting(tmp_path), progress=False)
    assert summary["metrics"] == {} and summary["train"] == {}
    kinds = summary["bytes"]["by_kind"]
    assert kinds.get("expert_response", 0) > 0 and kinds.get("gate_publish", 0) > 0 and "error" not in kinds
    model = build_experiment(resolve_experiment(_accounting(tmp_path / "x")), only="node-00").nodes["node-00"].learner.model
    one_expert = frame_sizes(encode("node-00", Message(MessageKind.EXPERT_RESPONSE, 0, expert_tensors({0: model.moe.expert_state(0)}))))[1]
    with open(tmp_path / "ledger.csv") as handle:
        payloads = [int(r["payload_bytes"]) for r in csv.DictReader(handle) if r["kind"] == "expert_response"]
    assert payloads and all(p % one_expert == 0 and p > 0 for p in payloads)  # whole experts, real sizes
    # every node fetches from its topology neighbours only: 4 gates out per node per round
    assert summary["bytes"]["messages"] >= 24 * 2 * 4


@pytest.mark.parametrize("spec, expected", [("constant:2.5", 2.5), ("none", 0.0)])
def test_simulated_compute_time_is_added_to_each_round(tmp_path, spec, expected):
    summary = run_simulation(_accounting(tmp_path, nodes=8, compute_time=spec), progress=False)
    seconds = summary["sim_seconds"]
    assert seconds["compute_per_round"] == expected
    assert seconds["by_round"][0] == pytest.approx(expected + (seconds["comm_total"] - 0) / 2, rel=1.0)
    assert seconds["total"] == pytest.approx(seconds["comm_total"] + 2 * expected)


def test_under_participation_only_the_sampled_clients_can_straggle(tmp_path):
    cfg = _accounting(tmp_path, nodes=8, compute_time="per_example:0.001", participation=0.25).replace_run(rounds=3)
    experiment = build_experiment(resolve_experiment(cfg))
    learners = {n: experiment.nodes[n].learner for n in experiment.clients}
    assert len({id(learner) for learner in learners.values()}) == len(learners)
    for k, learner in enumerate(learners.values()):  # accounting learners hold no data: give each a size
        learner.num_train_examples = 100 * (len(learners) - k)
    online = run_participation(cfg, list(learners))  # peer-to-peer: availability, so a round may have no one
    expected = [0.001 * max((learners[n].num_train_examples for n in online.sampled(r)), default=0) for r in range(3)]
    assert any(e < 0.8 for e in expected)  # some round leaves the largest client (node-00, 800 examples) out
    assert compute_seconds(cfg, experiment) == pytest.approx(expected)
    assert compute_seconds(cfg.replace_run(participation=1.0), experiment) == pytest.approx([0.8] * 3)


def test_a_bad_compute_time_is_refused():
    with pytest.raises(ValueError, match="compute_time must be none, constant:SECONDS or per_example:SECONDS"):
        default_config(compute_time="fast")


# Byte totals of 12 nodes, 3 rounds, seed 0, computed by the simulator before it was made
# faster (commit 76f5f7b): speeding it up must not change a single counted byte. Protocol
# version 2 (chunked transfers, issue 26) changed the header bytes only: a tensor-table row
# lost its frame count, a message of more than one chunk gained a transfer id and chunk heads;
# the payload totals are those of 76f5f7b.
PINNED_TOTALS = {
    "frozen": {
        "total": 4_073_679,
        "header": 58_983,
        "payload": 4_014_696,
        "messages": 390,
        "by_kind": {"expert_request": 8_811, "expert_response": 3_906_468, "gate_publish": 158_400},
    },
    "gossip": {
        "total": 64_722_015,
        "header": 102_903,
        "payload": 64_619_112,
        "messages": 534,
        "by_kind": {"embedding": 60_648_336, "expert_request": 8_811, "expert_response": 3_906_468, "gate_publish": 158_400},
    },
}


@pytest.mark.parametrize("embedding", sorted(PINNED_TOTALS))
def test_accounting_byte_totals_are_pinned(tmp_path, embedding):
    cfg = default_config(method="fedmoe-da", nodes=12, rounds=3, topology="random-regular:4", train="none", out=str(tmp_path), seed=0)
    options = {"embedding": embedding} | ({"embedding_peers": "all", "embedding_every": 1} if embedding == "gossip" else {})  # the pinned run's gossip
    summary = run_simulation(with_options(cfg, method_options=options), progress=False, report=False)
    assert {k: summary["bytes"][k] for k in PINNED_TOTALS[embedding]} == PINNED_TOTALS[embedding]
    with open(tmp_path / "metrics.jsonl") as handle:  # diagnostics still reach the file after leaving memory
        assert all("plan_weights" in json.loads(line)["diagnostics"] for line in handle)
