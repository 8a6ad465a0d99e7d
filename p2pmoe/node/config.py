"""A node's configuration file: who it is, where it listens, its peers, timing, keys and the
experiment it takes part in (the `[run]`, `[task]` and `[method]` tables of `p2pmoe simulate`).

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

    [run]                         # identical on every node but out, data_root, threads, device
    method = "fedavg"
    nodes = 3
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pmoe.config import SECTIONS, build_config, tables_of
from p2pmoe.node.security import CurveSettings, read_public_key
from p2pmoe.settings import ExperimentConfig

MIN_HEARTBEAT = 0.01


@dataclass(frozen=True)
class Timing:
    """Every wait a node makes is bounded by one of these (seconds)."""

    round_deadline: float = 120.0
    heartbeat: float = 1.0
    suspect_after: float = 3.0
    dead_after: float = 10.0
    startup: float = 60.0
    linger: float = 30.0
    # A peer answers a request only between its training and evaluation calls (the driver
    # serialises calls into a method), so the wait covers a peer's training time; three tries
    # still end before the default round deadline.
    request_timeout: float = 30.0
    request_retries: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (value >= 0 if f.name == "request_retries" else value > 0):
                raise ValueError(f"timing.{f.name} must be > 0, got {value}")
        if self.heartbeat < MIN_HEARTBEAT:  # a tighter loop only spins a core (issue 26 N10)
            raise ValueError(f"timing.heartbeat must be at least {MIN_HEARTBEAT} s, got {self.heartbeat}")
        if self.suspect_after > self.dead_after:
            raise ValueError("timing.suspect_after must be <= timing.dead_after")


def is_loopback(address: str) -> bool:
    """True for addresses no other machine can reach: ipc, inproc, tcp on 127.0.0.0/8, ::1, localhost."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    bind: str
    out: Path
    peers: dict[str, str]
    experiment: ExperimentConfig
    timing: Timing = field(default_factory=Timing)
    curve: CurveSettings | None = None
    max_inflight_bytes: int = 64 * 2**20
    insecure: bool = False  # plaintext on a non-loopback address: only when asked for (--insecure)

    def check_plaintext_bind(self) -> None:
        """Without CURVE keys anyone who reaches the node can read its messages and speak as
        any node (issue 26 N2), so plaintext listens on loopback only unless `insecure` says the
        user accepts that, as Flower's `--insecure` does."""
        if self.curve is None and not self.insecure and not is_loopback(self.bind):
            raise ValueError(
                f"node {self.node_id!r} would listen on {self.bind} without encryption or authentication: anyone who reaches it could "
                "read its messages and speak as any node; add a [security] table (keys from `p2pmoe keys`), bind to 127.0.0.1, "
                "or accept plaintext on this network with --insecure (or insecure = true in the node file)"
            )

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"


def _table(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{path}: [{key}] must be a table")
    return value


def _timing(raw: dict[str, Any], path: Path) -> Timing:
    """[timing] with every value a number (seconds; request_retries a count) and no unknown key."""
    known = {f.name: f.type for f in dataclasses.fields(Timing)}
    values: dict[str, Any] = {}  # checked one by one below; Timing's fields mix int and float
    for key, value in raw.items():
        if key not in known:
            raise ValueError(f"{path}: [timing] has unknown key {key!r}; valid keys: {sorted(known)}")
        wanted = int if key == "request_retries" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ValueError(f"{path}: [timing] {key} must be a number{' (a whole count)' if key == 'request_retries' else ' of seconds'}, got {value!r}")
        values[key] = value if key == "request_retries" else float(value)
    try:
        return Timing(**values)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _key_file(base: Path, security: dict[str, Any], key: str, path: Path) -> Path:
    value = security.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}: [security] {key} must name a key file written by `p2pmoe keys`")
    found = base / value
    if not found.is_file():
        raise ValueError(f"{path}: [security] {key}: no key file at {found} (write key pairs with `p2pmoe keys --out DIR NAME...`)")
    return found


def load_node_config(path: str | Path) -> NodeConfig:
    """Parse and check a node config file; relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read node config: {exc}") from None
    known = {"node_id", "bind", "out", "max_inflight_bytes", "insecure", "peers", "timing", "security", *SECTIONS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
    for key in ("node_id", "bind"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{path}: {key} must be a non-empty string")
    if not raw["bind"].startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"{path}: bind must be an address like 'tcp://0.0.0.0:5550', got {raw['bind']!r}")
    base = path.parent
    peers = _table(raw, "peers", path)
    if not all(isinstance(v, str) for v in peers.values()) or raw["node_id"] in peers:
        raise ValueError(f"{path}: [peers] maps other node ids to 'tcp://host:port' strings")
    timing = _timing(_table(raw, "timing", path), path)
    values = tables_of({s: raw[s] for s in SECTIONS if s in raw}, str(path))
    if "out" in values["run"]:
        raise ValueError(f"{path}: a node keeps its files in the top-level `out`; remove `out` from [run]")
    if isinstance(values["run"].get("data_root"), str) and not Path(values["run"]["data_root"]).is_absolute():
        values["run"]["data_root"] = str(base / values["run"]["data_root"])
    out = base / raw.get("out", f"runs/{raw['node_id']}")
    values["run"]["out"] = str(out)
    experiment = build_config(values, str(path))
    security = _table(raw, "security", path)
    curve = None
    if security:
        allowed = _table(security, "allowed", path)
        curve = CurveSettings(
            secret_key_file=_key_file(base, security, "secret_key", path),
            public_key_file=_key_file(base, security, "public_key", path),
            allowed_public_keys={node: read_public_key(_key_file(base, allowed, node, path)) for node in allowed},
        )
    inflight = raw.get("max_inflight_bytes", 64 * 2**20)
    if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 1:
        raise ValueError(f"{path}: max_inflight_bytes must be a positive integer, got {inflight!r}")
    insecure = raw.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ValueError(f"{path}: insecure must be true or false, got {insecure!r}")
    return NodeConfig(
        insecure=insecure,
        node_id=raw["node_id"],
        bind=raw["bind"],
        out=out,
        peers=dict(peers),
        experiment=experiment,
        timing=timing,
        curve=curve,
        max_inflight_bytes=inflight,
    )
