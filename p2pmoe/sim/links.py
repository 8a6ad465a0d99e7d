"""Simulated communication time of a round, from its ledger entries and a topology.

A fluid approximation, a project decision: each link is a full-duplex pipe whose bandwidth
is shared fairly among the messages crossing it (processor sharing), with no TCP dynamics
(slow start, congestion control, retransmits), no per-hop store-and-forward, and no CPU or
serialisation cost. It ranks methods and topologies by what they ask of the network; it does
not predict wall-clock time on a real LAN.

Model, per round:
- phases run one after another: phase k starts when every phase k−1 message has arrived
  (the ledger's `phase` is the causal depth of a message in its round);
- within a phase every message starts at once and follows one shortest path by hop count;
  among equal-length paths the breadth-first search from the source, visiting neighbours in
  sorted order, keeps the first one it finds (deterministic);
- an edge without `bandwidth` or `latency` gets the topology files' defaults (100 Mbit/s, 0.5 ms);
- on a directed link of bandwidth B carrying messages of b_1 <= b_2 <= ... bytes, message i
  finishes at Σ_j min(b_j, b_i)·8 / B; u→v and v→u do not share;
- a message takes the max of its finishing times over its path's links plus the sum of the
  latencies along the path; a phase takes its slowest message;
- a node not in the graph (the coordinator, "server") has a dedicated link of its own to
  every client, `server_link = (bandwidth_bps, latency_s)`: a star to the server.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Sequence

import networkx as nx
import numpy as np

from p2pmoe.ledger import LedgerEntry
from p2pmoe.topology import DEFAULT_BANDWIDTH, DEFAULT_LATENCY

_Path = tuple[np.ndarray, float]  # directed-link indices along the path, summed latency


class _Routes:
    """Shortest paths and directed-link tables of one graph, computed once and reused."""

    def __init__(self, graph: nx.Graph) -> None:
        self.link: dict[tuple[str, str], int] = {}
        bandwidth: list[float] = []
        latency: list[float] = []
        for u, v, attrs in graph.edges(data=True):
            for a, b in ((u, v), (v, u)):
                self.link[(a, b)] = len(bandwidth)
                bandwidth.append(float(attrs.get("bandwidth", DEFAULT_BANDWIDTH)))
                latency.append(float(attrs.get("latency", DEFAULT_LATENCY)))
        self.bandwidth = np.asarray(bandwidth, dtype=np.float64)
        self.latency = np.asarray(latency, dtype=np.float64)
        self.graph = graph
        self.parent: dict[str, dict[str, str]] = {}  # breadth-first trees, built per source on first use
        self.paths: dict[tuple[str, str], _Path] = {}

    @staticmethod
    def _bfs(graph: nx.Graph, source: str) -> dict[str, str]:
        """Parent of every node on the breadth-first tree from `source` (sorted neighbours)."""
        parent = {source: source}
        frontier = [source]
        while frontier:
            nxt = []
            for node in frontier:
                for peer in sorted(graph[node]):
                    if peer not in parent:
                        parent[peer] = node
                        nxt.append(peer)
            frontier = nxt
        return parent

    def path(self, src: str, dst: str) -> _Path:
        """The links from `src` to `dst` (both in the graph), memoised."""
        key = (src, dst)
        if key not in self.paths and (src, dst) in self.link:  # neighbours: the direct link (what BFS would find)
            link = np.asarray([self.link[(src, dst)]], dtype=np.int64)
            self.paths[key] = (link, float(self.latency[link].sum()))
        if key not in self.paths:
            if src not in self.parent:
                self.parent[src] = self._bfs(self.graph, src)
            parent = self.parent[src]
            if dst not in parent:
                raise ValueError(f"no path from {src} to {dst}: the topology is not connected")
            hops = []
            node = dst
            while node != src:
                hops.append(self.link[(parent[node], node)])
                node = parent[node]
            links = np.asarray(hops[::-1], dtype=np.int64)
            self.paths[key] = (links, float(self.latency[links].sum()))
        return self.paths[key]


_ROUTES: weakref.WeakKeyDictionary[nx.Graph, _Routes] = weakref.WeakKeyDictionary()


def _routes(graph: nx.Graph) -> _Routes:
    """Routes cached by graph identity: treat a graph as frozen once it has been timed."""
    routes = _ROUTES.get(graph)
    if routes is None:
        routes = _ROUTES[graph] = _Routes(graph)
    return routes


def _phase_time(messages: Sequence[LedgerEntry], graph: nx.Graph, routes: _Routes, server_link: tuple[float, float]) -> float:
    """Time until the last message of one phase has arrived."""
    server_links: dict[tuple[str, str], int] = {}  # (external, client) and (client, external), per phase
    link_ids: list[np.ndarray] = []
    path_latency = np.empty(len(messages), dtype=np.float64)
    for i, e in enumerate(messages):
        src_in, dst_in = e.src in graph, e.dst in graph
        if src_in and dst_in:
            path, path_latency[i] = routes.path(e.src, e.dst)
            link_ids.append(path)
            continue
        if not (src_in or dst_in):
            raise ValueError(f"cannot route {e.src} -> {e.dst}: neither is a node of the topology")
        index = server_links.setdefault((e.src, e.dst), len(routes.bandwidth) + len(server_links))
        link_ids.append(np.asarray([index], dtype=np.int64))
        path_latency[i] = server_link[1]
    bandwidth = np.concatenate([routes.bandwidth, np.full(len(server_links), server_link[0])])

    lengths = np.fromiter((len(p) for p in link_ids), dtype=np.int64, count=len(link_ids))
    owner = np.repeat(np.arange(len(messages)), lengths)
    links = np.concatenate(link_ids)
    size = np.fromiter((e.total for e in messages), dtype=np.int64, count=len(messages))[owner]

    # Processor sharing per link: with sizes sorted b_1 <= ... <= b_m, the p-th (0-based)
    # finishes after Σ_{q<p} b_q + (m − p)·b_p bytes have crossed the link.
    order = np.lexsort((size, links))
    links, size, owner = links[order], size[order], owner[order]
    starts = np.flatnonzero(np.r_[True, links[1:] != links[:-1]])
    counts = np.diff(np.r_[starts, len(links)])
    start = np.repeat(starts, counts)
    before = np.cumsum(size) - size  # bytes of all earlier rows, across links
    carried = before - before[start] + (np.repeat(counts, counts) - (np.arange(len(links)) - start)) * size
    finish = carried * 8.0 / bandwidth[links]

    slowest_link = np.zeros(len(messages), dtype=np.float64)
    np.maximum.at(slowest_link, owner, finish)
    return float((slowest_link + path_latency).max())


def round_comm_time(entries: Sequence[LedgerEntry], graph: nx.Graph, server_link: tuple[float, float] | None = None) -> float:
    """Simulated seconds the messages of one round spend on the network (see the module doc).

    `server_link` is (bandwidth in bits/s, latency in s) of each client's own link to a node
    outside the graph; default 100 Mbit/s and 0.5 ms, like the default topology links.
    """
    if not entries:
        return 0.0
    rounds = {e.round for e in entries}
    if len(rounds) > 1:
        raise ValueError(f"entries span rounds {sorted(rounds)}; use comm_time_by_round")
    bandwidth, latency = server_link if server_link is not None else (DEFAULT_BANDWIDTH, DEFAULT_LATENCY)
    if not bandwidth > 0 or not latency >= 0:
        raise ValueError(f"server_link must be (bandwidth > 0, latency >= 0), got {server_link!r}")
    routes = _routes(graph)
    phases: dict[int, list[LedgerEntry]] = defaultdict(list)
    for e in entries:
        phases[e.phase].append(e)
    return sum(_phase_time(phases[p], graph, routes, (float(bandwidth), float(latency))) for p in sorted(phases))


def comm_time_by_round(entries: Sequence[LedgerEntry], graph: nx.Graph, server_link: tuple[float, float] | None = None) -> dict[int, float]:
    """`round_comm_time` of every round present in `entries`, by round index."""
    by_round: dict[int, list[LedgerEntry]] = defaultdict(list)
    for e in entries:
        by_round[e.round].append(e)
    return {r: round_comm_time(by_round[r], graph, server_link) for r in sorted(by_round)}
