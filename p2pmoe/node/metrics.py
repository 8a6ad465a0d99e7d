"""A daemon's Prometheus metrics (issue 29 item 4): where people already look at a swarm.

`p2pmoe node --metrics-port 9100` serves `/metrics` (prometheus-client's own HTTP server, on
127.0.0.1 unless `--metrics-addr` says otherwise). Nothing is counted twice: a collector
reads the daemon's own state at each scrape, so the bytes are the ledger's (every message the
node sent, by kind and peer, as in ledger.csv), the bytes received are the transport's, the
peers' states are the membership table's and the metrics are the last round's row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from p2pmoe.ledger import LedgerEntry


@dataclass
class DaemonState:
    """What a scrape reads, as callables into the live daemon (read on the event loop's
    objects from the server's thread: each read is a snapshot of a list or a dict)."""

    node: str
    round: Callable[[], int]
    rounds_done: Callable[[], int]
    sent: Callable[[], list[LedgerEntry]]
    received: Callable[[], Mapping[str, int]]
    peers: Callable[[], Mapping[str, str]]
    last_metrics: Callable[[], Mapping[str, float]]
    compute_seconds: Callable[[], Mapping[str, float]]  # "train", "evaluate" -> wall seconds spent so far
    requests: Callable[[], tuple[int, float]]  # request round trips so far: (count, seconds)
    refused: Callable[[], int]  # messages refused so far (malformed, over budget, another experiment, a stranger's held)


class DaemonCollector(Collector):
    """Turns a `DaemonState` into metric families at every scrape."""

    def __init__(self, state: DaemonState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s, labels = self.state, ["node"]
        current = GaugeMetricFamily("p2pmoe_round", "the round the node is in (-1 before its first)", labels=labels)
        current.add_metric([s.node], s.round())
        yield current
        done = CounterMetricFamily("p2pmoe_rounds_done", "rounds the node has finished (its metrics.jsonl lines)", labels=labels)
        done.add_metric([s.node], s.rounds_done())
        yield done
        by_link: dict[tuple[str, str], int] = defaultdict(int)
        for entry in list(s.sent()):
            if entry.src == s.node:
                by_link[(entry.kind, entry.dst)] += entry.total
        sent = CounterMetricFamily("p2pmoe_sent_bytes", "encoded bytes sent (header + payload), by message kind and peer", labels=["node", "kind", "peer"])
        for (kind, peer), total in sorted(by_link.items()):
            sent.add_metric([s.node, kind, peer], total)
        yield sent
        received = CounterMetricFamily("p2pmoe_received_bytes", "bytes received on the node's sockets, by sender", labels=["node", "peer"])
        for peer, total in sorted(dict(s.received()).items()):
            received.add_metric([s.node, peer], total)
        yield received
        states = GaugeMetricFamily("p2pmoe_peers", "configured peers by liveness", labels=["node", "state"])
        counts = defaultdict(int, {"alive": 0, "suspect": 0, "dead": 0})
        for state in dict(s.peers()).values():
            counts[state] += 1
        for state, count in sorted(counts.items()):
            states.add_metric([s.node, state], count)
        yield states
        seconds = CounterMetricFamily("p2pmoe_compute_seconds", "wall seconds spent training and evaluating", labels=["node", "phase"])
        for phase, spent in sorted(dict(s.compute_seconds()).items()):
            seconds.add_metric([s.node, phase], spent)
        yield seconds
        trips, waited = s.requests()
        latency = SummaryMetricFamily("p2pmoe_request_seconds", "round trips of requests to peers (expert fetches, ...)", labels=labels)
        latency.add_metric([s.node], count_value=trips, sum_value=waited)
        yield latency
        refused = CounterMetricFamily("p2pmoe_refused_messages", "messages this node refused: malformed, over budget, of another experiment", labels=labels)
        refused.add_metric([s.node], s.refused())
        yield refused
        metric = GaugeMetricFamily("p2pmoe_metric", "the last evaluated round's metrics (accuracy, mrr, ...)", labels=["node", "name"])
        for name, value in sorted(dict(s.last_metrics()).items()):
            metric.add_metric([s.node, name], value)
        yield metric


class MetricsServer:
    """`/metrics` of one daemon on `addr:port` (port 0: any free port, see `port`)."""

    def __init__(self, state: DaemonState, port: int, addr: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(state))
        self._server: Any
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
