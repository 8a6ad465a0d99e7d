"""Topologies for the simulator: who can talk to whom, and over what links.

A topology is an undirected, connected, simple `networkx.Graph` whose nodes are the client ids
(`node-00`, `node-01`, ...) and whose every edge carries `bandwidth` (bits per second) and
`latency` (seconds), so the same file decides both who a node sees (FedMoE-DA's `hops`
neighbourhood, gossip neighbours) and how long its messages take (`p2pmoe.sim.links`).
Files are node-link JSON (what `save_topology` writes, networkx-readable) or plain edge lists
(`u v [bandwidth_bps] [latency_s]`, as decentralizepy and many graph tools write them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.naming import client_ids

DEFAULT_BANDWIDTH = 100e6  # bits per second: 100 Mbit/s Ethernet
DEFAULT_LATENCY = 0.0005  # seconds: one LAN hop
KINDS = ("full", "ring", "star", "random-regular:D", "small-world:K:P", "erdos-renyi:P")
EDGE_LIST_SUFFIXES = (".edges", ".txt")
_MAX_DRAWS = 100  # re-draws of a random kind before we call its parameters hopeless


class TopologyError(ValueError):
    """A topology that cannot be built, read or used, with the reason in words."""


def _number(text: str, what: str, cast: Callable[[str], Any]) -> Any:
    try:
        return cast(text)
    except ValueError:
        raise TopologyError(f"{what} must be {'an integer' if cast is int else 'a number'}, got {text!r}") from None


def _check_link(bandwidth: Any, latency: Any, where: str) -> tuple[float, float]:
    """Validated (bandwidth, latency) as floats; `where` names the edge or line for the error."""
    for name, value in (("bandwidth", bandwidth), ("latency", latency)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TopologyError(f"{where}: {name} must be a finite number, got {value!r}")
    if bandwidth <= 0:
        raise TopologyError(f"{where}: bandwidth must be > 0 bits per second, got {bandwidth!r}")
    if latency < 0:
        raise TopologyError(f"{where}: latency must be >= 0 seconds, got {latency!r}")
    return float(bandwidth), float(latency)


def _connected_draw(draw: Callable[[int], nx.Graph], seed: int, what: str, hint: str) -> nx.Graph:
    """The first connected graph among draws with seed, seed+1, ...: a disconnected swarm
    cannot run a decentralised method, and re-drawing keeps the result reproducible."""
    for attempt in range(_MAX_DRAWS):
        graph = draw(seed + attempt)
        if nx.is_connected(graph):
            return graph
    raise TopologyError(f"{what}: no connected graph in {_MAX_DRAWS} draws (seeds {seed}..{seed + _MAX_DRAWS - 1}); {hint}")


def _generate(kind: str, nodes: int, seed: int) -> tuple[nx.Graph, str]:
    """The integer-labelled graph for `kind` and its canonical spelling."""
    name, *params = kind.split(":")
    arity = {"full": 0, "ring": 0, "star": 0, "random-regular": 1, "small-world": 2, "erdos-renyi": 1}
    if name not in arity:
        raise TopologyError(f"unknown topology kind {kind!r}; choose from {', '.join(KINDS)}")
    if len(params) != arity[name]:
        spelled = next(k for k in KINDS if k.split(":")[0] == name)
        raise TopologyError(f"topology kind {kind!r}: expected {spelled!r}")
    if name == "full":
        return nx.complete_graph(nodes), name
    if name == "ring":
        if nodes < 3:
            raise TopologyError(f"a ring needs at least 3 nodes, got {nodes}")
        return nx.cycle_graph(nodes), name
    if name == "star":
        return nx.star_graph(nodes - 1), name
    if name == "random-regular":
        d = _number(params[0], "random-regular degree D", int)
        if not 1 <= d < nodes or (d * nodes) % 2:
            raise TopologyError(f"random-regular:{d} with {nodes} nodes: need 1 <= D < nodes and D * nodes even")
        graph = _connected_draw(
            lambda s: nx.random_regular_graph(d, nodes, seed=s),
            seed,
            f"random-regular:{d} with {nodes} nodes",
            "use D >= 3 (D = 1 never connects more than 2 nodes, D = 2 rarely does)",
        )
        return graph, f"random-regular:{d}"
    if name == "small-world":
        k = _number(params[0], "small-world neighbours K", int)
        p = _number(params[1], "small-world rewiring probability P", float)
        if not (2 <= k < nodes and k % 2 == 0) or not 0.0 <= p <= 1.0:
            raise TopologyError(f"small-world:{k}:{p:g} with {nodes} nodes: need K even, 2 <= K < nodes, 0 <= P <= 1")
        try:
            graph = nx.connected_watts_strogatz_graph(nodes, k, p, tries=_MAX_DRAWS, seed=seed)
        except nx.NetworkXError as err:
            raise TopologyError(f"small-world:{k}:{p:g} with {nodes} nodes: {err}") from None
        return graph, f"small-world:{k}:{p:g}"
    p = _number(params[0], "erdos-renyi edge probability P", float)
    if not 0.0 < p <= 1.0:
        raise TopologyError(f"erdos-renyi:{p:g}: need 0 < P <= 1")
    graph = _connected_draw(
        lambda s: nx.gnp_random_graph(nodes, p, seed=s),
        seed,
        f"erdos-renyi:{p:g} with {nodes} nodes",
        f"raise P (connectivity needs P above about ln(n)/n = {math.log(nodes) / nodes:.3g})",
    )
    return graph, f"erdos-renyi:{p:g}"


def make_topology(kind: str, nodes: int, seed: int = 0, bandwidth: float = DEFAULT_BANDWIDTH, latency: float = DEFAULT_LATENCY) -> nx.Graph:
    """A connected topology over `client_ids(nodes)` with identical links.

    Kinds: `full`, `ring`, `star` (hub node-00), `random-regular:D`, `small-world:K:P`
    (connected Watts–Strogatz, K even), `erdos-renyi:P`. Random kinds that come out
    disconnected are re-drawn with seed+1, seed+2, ... (bounded), so a seed names one graph.
    The graph attribute `name` is the file-friendly spelling, e.g. `small-world-4-0.2-10`.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
        raise TopologyError(f"a topology needs at least 2 nodes, got {nodes!r}")
    bandwidth, latency = _check_link(bandwidth, latency, "link")
    generated, canonical = _generate(kind, nodes, seed)
    ids = client_ids(nodes)
    graph = nx.Graph(name=f"{canonical.replace(':', '-')}-{nodes}", kind=canonical, seed=seed)
    graph.add_nodes_from(ids)
    edges = sorted((min(u, v), max(u, v)) for u, v in generated.edges())
    graph.add_edges_from(((ids[u], ids[v]) for u, v in edges), bandwidth=bandwidth, latency=latency)
    return graph


def save_topology(graph: nx.Graph, path: str | Path) -> Path:
    """Write `graph` atomically: node-link JSON, or an edge list for a .edges/.txt path."""
    path = Path(path)
    if path.suffix in EDGE_LIST_SUFFIXES:
        lines = ["# u v bandwidth_bps latency_s"]
        lines += [f"{u} {v} {d['bandwidth']!r} {d['latency']!r}" for u, v, d in graph.edges(data=True)]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    else:
        atomic_write_json(path, nx.node_link_data(graph, edges="edges"))
    return path


def write_topology(
    kind: str,
    nodes: int,
    out: str | Path,
    seed: int = 0,
    bandwidth: float = DEFAULT_BANDWIDTH,
    latency: float = DEFAULT_LATENCY,
) -> Path:
    """Generate a topology and save it (what `p2pmoe topology` runs); returns the path."""
    return save_topology(make_topology(kind, nodes, seed, bandwidth, latency), out)


def _read_node_link(path: Path, text: str) -> nx.Graph:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TopologyError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise TopologyError(f"{path}: not node-link JSON (expected an object with a 'nodes' list)")
    if data.get("directed") or data.get("multigraph"):
        raise TopologyError(f"{path}: the topology must be an undirected simple graph (directed/multigraph set)")
    edges_key = "links" if "edges" not in data and "links" in data else "edges"  # older networkx wrote 'links'
    try:
        graph = nx.node_link_graph(data, edges=edges_key)
    except (KeyError, TypeError, nx.NetworkXError) as err:
        raise TopologyError(f"{path}: malformed node-link JSON ({type(err).__name__}: {err})") from None
    for u, v, attrs in graph.edges(data=True):
        attrs["bandwidth"], attrs["latency"] = _check_link(
            attrs.get("bandwidth", DEFAULT_BANDWIDTH), attrs.get("latency", DEFAULT_LATENCY), f"{path}: edge {u}-{v}"
        )
    return graph


def _read_edge_list(path: Path, text: str) -> nx.Graph:
    graph = nx.Graph()
    first_line: dict[frozenset[str], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if not 2 <= len(fields) <= 4:
            raise TopologyError(f"{where}: expected 'u v [bandwidth_bps] [latency_s]', got {len(fields)} fields")
        u, v = fields[:2]
        if u == v:
            raise TopologyError(f"{where}: self loop on {u}")
        key = frozenset((u, v))
        if key in first_line:
            raise TopologyError(f"{where}: duplicate edge {u}-{v} (first on line {first_line[key]})")
        first_line[key] = number
        values = [_number(f, f"{where}: {name}", float) for f, name in zip(fields[2:], ("bandwidth", "latency"), strict=False)]
        values += [DEFAULT_BANDWIDTH, DEFAULT_LATENCY][len(values) :]
        bandwidth, latency = _check_link(values[0], values[1], where)
        graph.add_edge(u, v, bandwidth=bandwidth, latency=latency)
    return graph


def _relabel_integers(graph: nx.Graph, path: Path) -> nx.Graph:
    """Map integer labels 0..n-1 (ints in JSON, digit strings in edge lists) to client ids."""
    labels = list(graph.nodes)
    if not all((isinstance(n, int) and not isinstance(n, bool)) or (isinstance(n, str) and n.isdigit()) for n in labels):
        return graph
    numbers = {n: int(n) for n in labels}
    if sorted(numbers.values()) != list(range(len(labels))):
        raise TopologyError(f"{path}: integer node labels must be exactly 0..{len(labels) - 1}")
    ids = client_ids(len(labels))
    return nx.relabel_nodes(graph, {n: ids[i] for n, i in numbers.items()})


MAX_TOPOLOGY_BYTES = 32 * 2**20


def load_topology(path: str | Path, nodes: int | None = None) -> nx.Graph:
    """Read and validate a topology file (node-link .json, or .edges/.txt edge list).

    Missing link attributes get the defaults (100 Mbit/s, 0.5 ms). The graph must be
    connected and free of self loops; with `nodes`, its node set must be `client_ids(nodes)`,
    so a file written for another swarm size is refused rather than half-used.
    """
    path = Path(path)
    if not path.is_file():
        raise TopologyError(f"{path}: no such topology file")
    if path.stat().st_size > MAX_TOPOLOGY_BYTES:  # checked before reading: parsing costs ~50x the file in memory
        raise TopologyError(f"{path}: {path.stat().st_size} bytes; topology files are limited to {MAX_TOPOLOGY_BYTES} (about 100,000 nodes)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TopologyError(f"{path}: not UTF-8 text ({err.reason})") from None
    if path.suffix == ".json":
        graph = _read_node_link(path, text)
    elif path.suffix in EDGE_LIST_SUFFIXES:
        graph = _read_edge_list(path, text)
    else:
        raise TopologyError(f"{path}: unknown topology format; use .json (node-link) or .edges/.txt (edge list)")
    if graph.number_of_nodes() == 0:
        raise TopologyError(f"{path}: the topology has no nodes")
    loops = list(nx.selfloop_edges(graph))
    if loops:
        raise TopologyError(f"{path}: self loop on {loops[0][0]}")
    graph = _relabel_integers(graph, path)
    if not nx.is_connected(graph):
        parts = sorted((sorted(c) for c in nx.connected_components(graph)), key=len)
        raise TopologyError(f"{path}: the topology is not connected ({len(parts)} components; smallest: {parts[0][:5]})")
    if nodes is not None:
        expected, present = set(client_ids(nodes)), set(graph.nodes)
        if present != expected:
            missing, extra = sorted(expected - present), sorted(present - expected, key=str)
            raise TopologyError(
                f"{path}: nodes do not match a {nodes}-node swarm (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
            )
    graph.graph.setdefault("name", path.stem)
    return graph


def neighbours_within(graph: nx.Graph, node: str, hops: int) -> list[str]:
    """The nodes at most `hops` edges from `node`, sorted, without `node` itself: whom a
    FedMoE-DA node sees (and publishes its gate to) with option `hops`."""
    if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hops must be an integer >= 1, got {hops!r}")
    if node not in graph:
        raise TopologyError(f"{node!r} is not a node of topology {graph.graph.get('name', '')!r}")
    reach = nx.single_source_shortest_path_length(graph, node, cutoff=hops)
    return sorted(n for n in reach if n != node)


def metropolis_hastings_weights(own_degree: int, degrees: Mapping[str, int]) -> tuple[float, dict[str, float]]:
    """Gossip mixing weights of a node of degree `own_degree` with partners of the given
    degrees: w_kj = 1 / (1 + max(deg_k, deg_j)) and w_kk = 1 - sum_j w_kj, returned as
    (w_kk, {j: w_kj}).

    Both ends of a link compute the same weight, so the mixing matrix is symmetric and doubly
    stochastic on any graph (averaging converges to the mean). A node knows only its own
    degree: its partners' come with their messages (gossip's `meta.degree`); a partner that
    did not send is left out and its weight stays with the node.
    """
    weights = {j: 1.0 / (1 + max(own_degree, d)) for j, d in degrees.items()}
    return 1.0 - sum(weights.values()), weights
