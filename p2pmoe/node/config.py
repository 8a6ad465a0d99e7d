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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pmoe.config import SECTIONS, build_config, tables_of
from p2pmoe.experiment import ResolvedExperiment, resolve_experiment
from p2pmoe.node.mdns import host_and_port
from p2pmoe.node.security import CurveSettings, read_public_key
from p2pmoe.settings import NODE_LOCAL_KEYS

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
    experiment: ResolvedExperiment  # resolved here, at the edge: the daemon below never resolves
    timing: Timing = field(default_factory=Timing)
    curve: CurveSettings | None = None
    max_inflight_bytes: int = 64 * 2**20
    insecure: bool = False  # plaintext on a non-loopback address: only when asked for (--insecure)
    min_peers: int = 0  # a round with fewer live peers makes the node exit non-zero (--min-peers; the coordinator's peers are its clients)
    metrics_port: int | None = None  # serve Prometheus /metrics there (--metrics-port; 0: any free port)
    metrics_addr: str = "127.0.0.1"
    # discovery (issue 29, `--join`): peers still to be found, members to ask, our own address for them
    discover: frozenset[str] = frozenset()
    join: tuple[str, ...] = ()
    advertise: str | None = None
    mdns: bool = False  # also announce and find peers by mDNS (python-zeroconf)

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
    known = {"node_id", "bind", "out", "max_inflight_bytes", "insecure", "min_peers", "peers", "timing", "security", *SECTIONS}
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
    experiment = resolve_experiment(build_config(values, str(path)))
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
    insecure, min_peers = raw.get("insecure", False), raw.get("min_peers", 0)
    if not isinstance(insecure, bool):
        raise ValueError(f"{path}: insecure must be true or false, got {insecure!r}")
    if isinstance(min_peers, bool) or not isinstance(min_peers, int) or not 0 <= min_peers <= len(peers):
        raise ValueError(f"{path}: min_peers must be a whole number from 0 to the {len(peers)} configured peers, got {min_peers!r}")
    return NodeConfig(
        insecure=insecure,
        min_peers=min_peers,
        node_id=raw["node_id"],
        bind=raw["bind"],
        out=out,
        peers=dict(peers),
        experiment=experiment,
        timing=timing,
        curve=curve,
        max_inflight_bytes=inflight,
    )


def node_config_from_experiment(
    experiment_path: str | Path,
    roster_path: str | Path | None,
    node_id: str,
    bind: str | None = None,
    out: str | Path | None = None,
    local: Mapping[str, Any] | None = None,
    keys: str | Path | None = None,
    insecure: bool = False,
    join: Sequence[str] = (),
    advertise: str | None = None,
    mdns: bool = False,
) -> NodeConfig:
    """A node's config from the files every machine shares, plus what is the machine's own.

    Issue 29: a swarm of 50 machines needed 50 hand-written node files, each repeating the
    experiment and listing its neighbours' addresses. Now every machine has the same
    experiment file (`[run]`, `[task]`, `[method]` and optionally `[timing]`) and the same
    roster (`[nodes]`: node id = address of its ROUTER); a node's peers are its links in the
    experiment's topology (`links`), their addresses come from the roster. What differs per
    machine comes from flags: `node_id`, `bind` (default: the node's own roster address; give
    `tcp://0.0.0.0:PORT` when the roster names the machine by a host name), `out` (default `runs/<id>`), the node-local `[run]` keys in
    `local` (`data_root`, `threads`, `device`) and `keys`, a folder written by `p2pmoe keys`
    (`<id>.key_secret`, `<id>.key` and every peer's `<peer>.key`), which turns CURVE on.

    Without a roster (`roster_path` None) the node discovers its peers' addresses at start-up
    (`join`: members to ask, `ID=tcp://host:port` or, in plaintext, a bare address; none for
    the first member, which waits to be asked; with `mdns` also by mDNS on the LAN) and tells
    them `advertise` (default: `bind`).
    """
    experiment_path = Path(experiment_path)
    try:
        raw = tomllib.loads(experiment_path.read_text())
        roster_raw = tomllib.loads(Path(roster_path).read_text()) if roster_path is not None else None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the experiment or roster file: {exc}") from None
    timing = _timing(_table(raw, "timing", experiment_path), experiment_path)
    values = tables_of({k: v for k, v in raw.items() if k != "timing"}, str(experiment_path))
    for key, value in (local or {}).items():
        if key not in NODE_LOCAL_KEYS:
            raise ValueError(f"{key!r} is not a node-local [run] key; those are {sorted(NODE_LOCAL_KEYS)} (the rest belongs in {experiment_path})")
        values["run"][key] = value
    if "out" in values["run"]:
        raise ValueError(f"{experiment_path}: [run] out is each machine's own: remove it and pass --out (default runs/<id>)")
    values["run"]["out"] = str(out or Path("runs") / node_id)
    experiment = resolve_experiment(build_config(values, str(experiment_path)))
    expected = experiment.node_ids
    if bind is not None and not bind.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"--bind must be an address like 'tcp://0.0.0.0:5550', got {bind!r}")
    discovery: dict[str, Any] = {}
    if roster_path is None:
        if node_id not in expected:
            raise ValueError(f"--id {node_id!r} is not a node of {experiment_path}; its nodes are {expected}")
        if bind is None:
            raise ValueError("without --roster, give --bind (where this node listens) and --join (a member to ask; none for the first member)")
        address = advertise or bind
        if any(host in address for host in ("0.0.0.0", "*", "[::]")):
            raise ValueError(f"--bind {bind} listens on every interface: give --advertise tcp://THIS-HOST:PORT, the address peers should dial")
        members = tuple(parse_join(target, expected, keys is not None) for target in join)
        if mdns:
            host_and_port(address)  # a literal IPv4 address to announce, checked now rather than at start-up
        peers: dict[str, str] = {}
        discovery = {"discover": frozenset(experiment.links()[node_id]), "join": members, "advertise": address, "mdns": mdns}
    else:
        if mdns:
            raise ValueError("--mdns finds peers without a roster: give either --roster FILE or --mdns (with --bind)")
        roster = _table(roster_raw or {}, "nodes", Path(roster_path))
        if set(roster_raw or {}) - {"nodes"} or not all(isinstance(v, str) and v.startswith("tcp://") for v in roster.values()):
            raise ValueError(f"{roster_path}: a roster is one table [nodes] of node id = 'tcp://host:port'")
        missing, extra = sorted(set(expected) - set(roster)), sorted(set(roster) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{roster_path} does not match {experiment_path}: the experiment has nodes {expected}; missing from the roster: {missing}, "
                f"not in the experiment: {extra}"
            )
        if node_id not in roster:
            raise ValueError(f"--id {node_id!r} is not in {roster_path}; its nodes are {sorted(roster)}")
        peers = {peer: roster[peer] for peer in experiment.links()[node_id]}
        bind = bind or roster[node_id]
    curve = None
    if keys is not None:
        folder = Path(keys)
        # with discovery any node of the experiment may ask us for the roster: every one is allowed
        allowed = list(peers) if roster_path is not None else [n for n in expected if n != node_id]
        key_of = {name: folder / f"{name}.key" for name in [node_id, *allowed]}
        for path in [folder / f"{node_id}.key_secret", *key_of.values()]:
            if not path.is_file():
                raise ValueError(f"--keys {folder}: no key file {path.name} (write key pairs with `p2pmoe keys --out {folder} {' '.join(expected)}`)")
        curve = CurveSettings(
            secret_key_file=folder / f"{node_id}.key_secret",
            public_key_file=key_of[node_id],
            allowed_public_keys={peer: read_public_key(key_of[peer]) for peer in allowed},
        )
    return NodeConfig(node_id, bind, Path(values["run"]["out"]), peers, experiment, timing, curve, insecure=insecure, **discovery)


def parse_join(target: str, nodes: Sequence[str], curve: bool) -> str:
    """A `--join` value: `ID=tcp://host:port` or, without CURVE, a bare `tcp://host:port` (with
    CURVE the member's id names the public key its connection is checked against)."""
    member, _, address = target.rpartition("=")
    if not address.startswith(("tcp://", "ipc://")) or (member and member not in nodes):
        raise ValueError(f"--join {target!r}: give ID=tcp://host:port (ID one of the experiment's nodes) or tcp://host:port")
    if curve and not member:
        raise ValueError(f"--join {target!r}: with --keys, name the member: ID=tcp://host:port")
    return target
