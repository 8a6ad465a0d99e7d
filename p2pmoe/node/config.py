"""A node's configuration file: who it is, where it listens, its peers, timing, keys and the
experiment it takes part in (the same keys as `p2pmoe simulate`).

    node_id = "node-00"
    bind = "tcp://0.0.0.0:5550"
    out = "runs/lan/node-00"

    [peers]                       # node id = address of its ROUTER
    server = "tcp://192.168.1.10:5550"

    [timing]                      # seconds
    round_deadline = 120.0

    [security]                    # optional: CURVE; key files written by `p2pmoe keys`
    secret_key = "keys/node-00.key_secret"
    public_key = "keys/node-00.key"
    [security.allowed]
    server = "keys/server.key"

    [experiment]
    method = "fedavg"
    nodes = 3
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pmoe.config import RunConfig, convert_value
from p2pmoe.node.security import CurveSettings, read_public_key


@dataclass(frozen=True)
class Timing:
    """Every wait a node makes is bounded by one of these (seconds)."""

    round_deadline: float = 120.0
    heartbeat: float = 1.0
    suspect_after: float = 3.0
    dead_after: float = 10.0
    startup: float = 60.0
    linger: float = 30.0
    request_timeout: float = 10.0
    request_retries: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (value >= 0 if f.name == "request_retries" else value > 0):
                raise ValueError(f"timing.{f.name} must be > 0, got {value}")
        if self.suspect_after > self.dead_after:
            raise ValueError("timing.suspect_after must be <= timing.dead_after")


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    bind: str
    out: Path
    peers: dict[str, str]
    experiment: RunConfig
    timing: Timing = field(default_factory=Timing)
    curve: CurveSettings | None = None
    max_inflight_bytes: int = 64 * 2**20

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"


def _table(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{path}: [{key}] must be a table")
    return value


def load_node_config(path: str | Path) -> NodeConfig:
    """Parse and check a node config file; relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read node config: {exc}") from None
    known = {"node_id", "bind", "out", "max_inflight_bytes", "peers", "timing", "security", "experiment"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
    for key in ("node_id", "bind"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{path}: {key} must be a non-empty string")
    base = path.parent
    peers = _table(raw, "peers", path)
    if not all(isinstance(v, str) for v in peers.values()) or raw["node_id"] in peers:
        raise ValueError(f"{path}: [peers] maps other node ids to 'tcp://host:port' strings")
    try:
        timing = Timing(**{k: (int(v) if k == "request_retries" else float(v)) for k, v in _table(raw, "timing", path).items()})
    except TypeError as exc:
        raise ValueError(f"{path}: [timing]: {exc}") from None
    experiment_values = _table(raw, "experiment", path)
    unknown = sorted(set(experiment_values) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ValueError(f"{path}: [experiment] has unknown keys {unknown}")
    if isinstance(experiment_values.get("data_root"), str) and not Path(experiment_values["data_root"]).is_absolute():
        experiment_values["data_root"] = str(base / experiment_values["data_root"])
    experiment = RunConfig(**{k: convert_value(k, v) for k, v in experiment_values.items()})
    security = _table(raw, "security", path)
    curve = None
    if security:
        allowed = _table(security, "allowed", path)
        curve = CurveSettings(
            secret_key_file=base / security["secret_key"],
            public_key_file=base / security["public_key"],
            allowed_public_keys={node: read_public_key(base / key) for node, key in allowed.items()},
        )
    return NodeConfig(
        node_id=raw["node_id"],
        bind=raw["bind"],
        out=base / raw.get("out", f"runs/{raw['node_id']}"),
        peers=dict(peers),
        experiment=experiment,
        timing=timing,
        curve=curve,
        max_inflight_bytes=int(raw.get("max_inflight_bytes", 64 * 2**20)),
    )
