"""FedAvg on Flower with p2pmoe's fmnist task: the baseline of bench/bench_vs_flower.py.

The ClientApp builds its learner with `ImageTask.learners`, the very call `p2pmoe simulate`
and `p2pmoe swarm` make, so client k gets the same Dirichlet split, the same 2,000-example
cap, the same initial weights, the same MoE classifier, SGD settings and batch order, and is
scored by the same `evaluate` (own test split and the fixed 2,000-image global sample). The
ServerApp runs Flower's own FedAvg strategy (weighted by training examples, as p2pmoe's) and
writes the per-round client metrics, averaged over clients without weights as p2pmoe's
summary does, to the `result-path` JSON file.

Only this module imports flwr; the bench process itself does not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from p2pmoe.config import default_config, resolve
from p2pmoe.learners.base import Learner
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.models.params import float_state, load_float_state
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.image import ImageTask

client_app = ClientApp()
server_app = ServerApp()

# Learners built in this process, by (nodes, partition, cap, seed, client): the simulation
# engine reuses its worker processes, so the data set is read once per worker rather than
# per message. Deployment runs every message in a fresh `flwr-clientapp` process and rebuilds.
_LEARNERS: dict[tuple[int, str, int, int, int], ImageClassifierLearner] = {}
_LEARNER_STATE = "learner"  # Context.state key of the learner's state_dict (weights and batch-order RNG)


def experiment_config(run_config: dict[str, object]) -> ExperimentConfig:
    """The p2pmoe config `p2pmoe simulate --method fedavg --data fmnist ...` would build."""
    return resolve(
        default_config(
            method="fedavg",
            data="fmnist",
            nodes=int(str(run_config["nodes"])),
            partition=str(run_config["partition"]),
            rounds=int(str(run_config["num-server-rounds"])),
            local_epochs=int(str(run_config["local-epochs"])),
            max_train_per_node=int(str(run_config["max-train-per-node"])),
            seed=int(str(run_config["seed"])),
        )
    )


def _learner(context: Context) -> ImageClassifierLearner:
    """This node's learner, restored to where its previous round left it.

    Why its state goes through `Context.state`: a deployment ClientApp process lives for one
    message, and p2pmoe's learner draws each round's batch order from where the previous
    round left its generator; without it Flower would train on a different order.
    """
    cfg = experiment_config(dict(context.run_config))
    client = int(str(context.node_config["partition-id"]))
    key = (cfg.run.nodes, cfg.run.partition, cfg.run.max_train_per_node or 0, cfg.run.seed, client)
    if key not in _LEARNERS:
        built: Learner = ImageTask().learners(cfg, [client])[client]
        assert isinstance(built, ImageClassifierLearner)
        _LEARNERS[key] = built
    learner = _LEARNERS[key]
    if _LEARNER_STATE in context.state:
        learner.load_state_dict(context.state.array_records[_LEARNER_STATE].to_torch_state_dict())
    return learner


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """One FedAvg client round: adopt the global weights, train the configured epochs, upload."""
    learner = _learner(context)
    load_float_state(learner.model, message.content.array_records["arrays"].to_torch_state_dict())
    stats = learner.train(int(str(context.run_config["local-epochs"])))
    context.state[_LEARNER_STATE] = ArrayRecord(learner.state_dict())
    metrics = MetricRecord({"train_loss": stats["train_loss"], "torch-threads": torch.get_num_threads(), "num-examples": learner.num_train_examples})
    return Message(RecordDict({"arrays": ArrayRecord(float_state(learner.model)), "metrics": metrics}), reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the global weights with p2pmoe's own evaluation of this client."""
    learner = _learner(context)
    load_float_state(learner.model, message.content.array_records["arrays"].to_torch_state_dict())
    metrics = MetricRecord({**learner.evaluate(), "num-examples": len(learner.test_y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def mean_over_clients(replies: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Unweighted mean of every metric over clients: what p2pmoe's summary reports, so the two
    systems' accuracies are the same statistic (Flower's default would weight by examples)."""
    records = [record for reply in replies for record in reply.metric_records.values()]
    keys = [k for k in records[0] if k != weighting_key]
    return MetricRecord({k: sum(float(str(r[k])) for r in records) / len(records) for k in keys})


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's FedAvg with every client in every round, then the results as JSON."""
    run_config = dict(context.run_config)
    cfg = experiment_config(run_config)
    nodes = cfg.run.nodes
    strategy = FedAvg(
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
        train_metrics_aggr_fn=mean_over_clients,
        evaluate_metrics_aggr_fn=mean_over_clients,
    )
    template = ImageTask().template(cfg)  # seeded as every p2pmoe client's initial model
    started = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(float_state(template)), num_rounds=cfg.run.rounds, train_config=ConfigRecord())
    rounds = sorted(result.evaluate_metrics_clientapp)
    out = {
        "rounds": len(rounds),
        "strategy_seconds": time.perf_counter() - started,
        "metrics": dict(result.evaluate_metrics_clientapp[rounds[-1]]) if rounds else {},
        "by_round": {str(r): dict(result.evaluate_metrics_clientapp[r]) for r in rounds},
        "train_by_round": {str(r): dict(m) for r, m in sorted(result.train_metrics_clientapp.items())},
    }
    path = str(run_config["result-path"])
    if path:
        Path(path).write_text(json.dumps(out, indent=1))
