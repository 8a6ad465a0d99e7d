"""Run configuration: dataclass defaults < a TOML file < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from p2pmoe.wire.compression import parse_compression

FMOE_GATE_POOLINGS = ("sequence", "position", "batch")
FMOE_HEADS = ("linear", "tied")
# string options with a fixed set of values (fmoe_encoder "lean" ships only the μ stack)
_CHOICES = {
    "embedding": ("gossip", "frozen", "server"),
    "fmoe_encoder": ("vae", "lean"),
    "fmoe_gate_pooling": FMOE_GATE_POOLINGS,
    "fmoe_head": FMOE_HEADS,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rerun a simulation; saved whole into summary.json."""

    method: str = "fedavg"
    data: str = "fmnist"
    data_root: str | None = None
    nodes: int = 10
    partition: str = "dirichlet:0.5"
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    seed: int = 0
    experts: int = 4
    embed_dim: int = 64
    expert_hidden: int = 64
    gate: str = "dense"
    top_k: int | None = None
    eval_every: int = 1
    compression: str = "none"
    topology: str = "full"
    hops: int = 1
    link_bandwidth: float = 100e6
    link_latency: float = 0.0005
    fedmoe_p: int = 2
    fedmoe_tau: float = 1.0
    fedmoe_interval: int = 1
    embedding: str = "gossip"
    max_len: int = 16
    dropout: float = 0.3
    negatives: int = 999
    contrastive_weight: float = 0.1
    fmoe_encoder: str = "vae"
    fmoe_gate_pooling: str = "sequence"
    fmoe_head: str = "linear"
    max_train_per_node: int | None = None
    threads: int = 0
    out: str = "runs/latest"

    def __post_init__(self) -> None:
        positive = ("nodes", "rounds", "local_epochs", "batch_size", "experts", "embed_dim", "expert_hidden", "eval_every", "hops", "fedmoe_interval", "max_len", "negatives")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_per_node is not None and self.max_train_per_node < 1:
            raise ValueError(f"config: max_train_per_node must be >= 1, got {self.max_train_per_node}")
        parse_compression(self.compression)
        if self.fedmoe_p < 0 or self.fedmoe_tau <= 0:
            raise ValueError(f"config: need fedmoe_p >= 0 and fedmoe_tau > 0, got {self.fedmoe_p}, {self.fedmoe_tau}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"config: {name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"config: lr must be > 0, got {self.lr}")


_FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}


def convert_value(name: str, value: Any) -> Any:
    """Coerce a TOML or command-line value to the field's type, with an error naming the key."""
    kind = _FIELD_TYPES[name]
    if value is None:
        return None
    try:
        if "int" in kind and "float" not in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if "float" in kind:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config: {name} must be of type {kind}, got {value!r}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file; unknown keys are an error (a typo must not be silently ignored)."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(_FIELD_TYPES)}")
    return {name: convert_value(name, value) for name, value in raw.items()}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per config field (dashes for underscores), plus --config FILE."""
    parser.add_argument("--config", type=Path, help="TOML file with any of the options below")
    for f in fields(RunConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=f"(default: {f.default})")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """Defaults, then the --config file, then explicit flags, then `overrides`."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    for name in _FIELD_TYPES:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = convert_value(name, given)
    values.update(overrides)
    return dataclasses.replace(RunConfig(), **values)
