"""What a run is: the common options (`[run]`) and the whole experiment (run + task + method).

Torch-free and registry-free, so every layer can hold a config without importing the layers
above it. Where the values come from (defaults, TOML, flags) is `p2pmoe.config`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from p2pmoe.options import Options, option
from p2pmoe.participation import parse_churn

# Keys that may differ between the nodes of one experiment: where a node keeps its files and
# data, and how it uses its own hardware. Everything else must agree (see `canonical_config`).
NODE_LOCAL_KEYS = frozenset({"out", "data_root", "threads", "workers", "device", "plugins", "tensorboard", "mlflow"})


@dataclass(frozen=True)
class RunOptions(Options):
    """Options every method and task shares."""

    section: ClassVar[str] = "run"

    method: str = option("fedavg", "the federated method (see docs/methods.md)")
    data: str = option("fmnist", "data set; it decides the task family")
    data_root: str | None = option(
        None,
        "folder of the data set: required for fkcb, aliexpress, cifar10 and your own atomic / atomic-timelines files "
        "(the folder NAME/ that holds NAME.inter and NAME.item); optional for mnist, fmnist and MovieLens",
    )
    nodes: int = option(10, "number of clients (sequence tasks: one per domain, set from the data)", minimum=1, maximum=100_000)
    partition: str = option("dirichlet:0.5", "how image labels are split: iid, dirichlet:ALPHA or shards:N")
    rounds: int = option(20, "communication rounds", minimum=1)
    participation: float = option(
        1.0,
        "methods with a server: fraction of clients sampled each round; peer-to-peer methods and local: probability that a node is online in a round "
        "(seeded; 1: everyone). Absent clients neither train nor send; see docs/methods.md",
        above=0,
        maximum=1,
    )
    churn: str = option(
        "",
        "nodes that join or leave mid-run, e.g. node-05:join@3,node-02:leave@5 (the node exists from round 3 / is gone from round 5 on); "
        "the simulator and a swarm run the same schedule",
    )
    attack: str = option(
        "",
        "what attackers lie with (issue 30): noise:SIGMA, sign-flip:SCALE, fill:VALUE, label-flip, mimic-mean or mimic:NODE (FedMoE-DA gates), "
        "joined by +; see docs/methods.md",
    )
    attackers: float = option(0.0, "fraction of the clients that attack (a seeded draw); 0: nobody lies", minimum=0, maximum=0.99)
    local_epochs: int = option(1, "local epochs per round", minimum=1)
    batch_size: int = option(64, "training batch size", minimum=1)
    lr: float | None = option(None, "learning rate; none takes the task's default (images 0.05 SGD, sequences 1e-3 Adam)", above=0)
    seed: int = option(0, "one seed for partition, initial weights and shuffling")
    eval_every: int = option(1, "evaluate every N rounds (and always after the last)", minimum=1)
    eval_point: str = option(
        "aggregated",
        "where a node is evaluated: aggregated (after the round's exchange), trained (after the round's local training, before its exchange: "
        "the model a node serves) or both (the trained point's metrics named accuracy@trained, ...)",
        choices=("aggregated", "trained", "both"),
    )
    compression: str = option("none", "wire compression: none, fp16, int8, or per kind: model_update=int8,model_global=fp16")
    topology: str = option("full", "clients' graph: full, ring, star, random-regular:D, small-world:K:P, erdos-renyi:P, or a file")
    hops: int = option(1, "a node sees peers within this many hops of the topology", minimum=1)
    link_bandwidth: float = option(100e6, "bits/s of generated links, for simulated time", above=0)
    link_latency: float = option(0.0005, "seconds of generated links, for simulated time", minimum=0)
    max_train_per_node: int | None = option(None, "cap each client's training examples (quick looks)", minimum=1)
    train: str = option(
        "local",
        "local: train and evaluate; none: accounting only (no training or evaluation, every message keeps its real size through the codec and the ledger)",
        choices=("local", "none"),
    )
    compute_time: str = option("none", "simulated training time of a node per round: none, constant:SECONDS or per_example:SECONDS (added to sim_seconds)")
    threads: int = option(
        0, "torch threads per process (per worker with workers > 1); 0: all cores for simulate (1 with workers), cores // processes for swarm", minimum=0
    )
    workers: int = option(
        1,
        "simulate, CPU: nodes that train and evaluate at once, in threads of one process; same metrics, bytes and sim_seconds "
        "(methods that draw from torch's global RNG stop with an error)",
        minimum=1,
    )
    device: str = option("auto", "where models train: auto (CUDA when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    out: str = option("runs/latest", "run folder")
    plugins: str = option("", "comma-separated modules or .py files that register methods or task families (a user's own, outside the package); see the README")
    tensorboard: str | None = option(None, "also write each node's metrics per round as TensorBoard scalars under this folder (needs p2pmoe[track])")
    mlflow: str | None = option(
        None, "also log the setting and each node's metrics per round to this MLflow tracking URI, e.g. file:./mlruns (needs p2pmoe[track])"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from p2pmoe.wire.compression import parse_compression  # imports torch: only when a run is configured

        parse_compression(self.compression)
        parse_compute_time(self.compute_time)
        parse_churn(self.churn)


def parse_compute_time(spec: str) -> tuple[str, float]:
    """`none`, `constant:S` (every node trains S seconds a round) or `per_example:S` (S seconds
    per training example and epoch, so nodes with more data straggle) -> (kind, seconds)."""
    kind, _, value = spec.partition(":")
    if spec == "none":
        return "none", 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if kind not in ("constant", "per_example") or not seconds >= 0:
        raise ValueError(f"[run] compute_time must be none, constant:SECONDS or per_example:SECONDS, got {spec!r}")
    return kind, seconds


@dataclass(frozen=True)
class ExperimentConfig:
    """One run: common options, the task family's options and the method's options."""

    run: RunOptions
    task: Options
    method: Options

    def replace_run(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, run=dataclasses.replace(self.run, **changes))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The whole setting as written to summary.json and node files."""
        return {"run": self.run.to_dict(), "task": self.task.to_dict(), "method": self.method.to_dict()}


def canonical_config(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """The part of a config every node of one experiment must share (node-local keys dropped)."""
    setting = cfg.to_dict()
    setting["run"] = {k: v for k, v in setting["run"].items() if k not in NODE_LOCAL_KEYS}
    return setting


def config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 of the canonical config as sorted JSON: equal exactly when the experiments are."""
    text = json.dumps(canonical_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_differences(mine: dict[str, dict[str, Any]], theirs: Any, sides: tuple[str, str] = ("here", "there")) -> list[str]:
    """Each key whose value differs between two canonical configs, with both values
    (`run.seed: 0 here, 1 there`: issue 29, the key alone did not say which side to fix);
    `theirs` comes from a peer, so anything that is not a table of tables differs entirely."""
    if not isinstance(theirs, dict):
        return ["<whole config>"]
    keys = []
    for section in sorted(set(mine) | set(theirs), key=str):
        a, b = mine.get(section, {}), theirs.get(section, {})
        if not isinstance(b, dict):
            keys.append(str(section))
            continue
        for k in sorted(set(a) | set(b), key=str):
            ours, other = a.get(k, "<absent>"), b.get(k, "<absent>")
            if ours != other:
                keys.append(f"{section}.{k}: {ours!r} {sides[0]}, {other!r} {sides[1]}")
    return keys
