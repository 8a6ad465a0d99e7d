"""Issue 29 item 4: a daemon's Prometheus metrics, parsed with prometheus-client's own parser;
the bytes are the ledger's."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from stub_methods import Idle

from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.ledger import LedgerEntry
from p2pmoe.node.config import NodeConfig, Timing
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.metrics import DaemonCollector, DaemonState
from p2pmoe.node.swarm import free_ports


def _samples(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_the_collector_reports_the_ledger_membership_and_last_metrics_exactly():
    sent = [LedgerEntry(0, "a", "b", "gate_publish", 10, 100), LedgerEntry(0, "a", "b", "gate_publish", 10, 50), LedgerEntry(1, "a", "c", "embedding", 5, 7)]
    state = DaemonState(
        "a",
        lambda: 1,
        lambda: 1,
        lambda: sent,
        lambda: {"b": 123},
        lambda: {"b": "alive", "c": "dead"},
        lambda: {"accuracy": 0.5},
        lambda: {"train": 2.5, "evaluate": 0.5},
        lambda: (4, 0.2),
        lambda: 3,
    )

    class Registry:
        def collect(self):
            return DaemonCollector(state).collect()

    families = _samples(generate_latest(Registry()).decode())  # type: ignore[arg-type]
    sent_bytes = {(s.labels["kind"], s.labels["peer"]): s.value for s in families["p2pmoe_sent_bytes"]}
    assert sent_bytes == {("gate_publish", "b"): 170, ("embedding", "c"): 12}
    assert {s.labels["state"]: s.value for s in families["p2pmoe_peers"]} == {"alive": 1, "dead": 1, "suspect": 0}
    assert [(s.labels["name"], s.value) for s in families["p2pmoe_metric"]] == [("accuracy", 0.5)]
    assert [s.value for s in families["p2pmoe_received_bytes"]] == [123] and [s.value for s in families["p2pmoe_round"]] == [1]
    assert {s.labels["phase"]: s.value for s in families["p2pmoe_compute_seconds"] if s.name.endswith("_total")} == {"train": 2.5, "evaluate": 0.5}
    assert {s.name: s.value for s in families["p2pmoe_request_seconds"]} == {"p2pmoe_request_seconds_count": 4, "p2pmoe_request_seconds_sum": 0.2}
    assert [s.value for s in families["p2pmoe_refused_messages"] if s.name.endswith("_total")] == [3]


def test_a_live_daemon_serves_metrics_whose_bytes_match_its_ledger(tmp_path: Path):
    a, b = free_ports(2)
    addresses = {"node-00": f"tcp://127.0.0.1:{a}", "node-01": f"tcp://127.0.0.1:{b}"}
    timing = Timing(round_deadline=10, heartbeat=0.2, suspect_after=1, dead_after=3, startup=10, linger=1)
    experiment = resolve_experiment(default_config(method="local", nodes=2, rounds=3))
    configs = {
        n: NodeConfig(
            n, addresses[n], tmp_path / n, {p: x for p, x in addresses.items() if p != n}, experiment, timing, metrics_port=0 if n == "node-00" else None
        )
        for n in addresses
    }

    class Slow(Idle):  # long enough rounds for a scrape in the middle of the run
        seconds = 0.5
        accuracy = 0.25

    daemons = {n: NodeDaemon(cfg, method=Slow(n)) for n, cfg in configs.items()}
    seen: dict[str, object] = {}

    async def scrape() -> None:
        watched = daemons["node-00"]
        while watched.rounds_done < 1:
            await asyncio.sleep(0.05)
        assert watched.metrics is not None
        before = _by_kind(watched.ledger.entries)
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{watched.metrics.port}/metrics", timeout=5).read().decode())
        after = _by_kind(watched.ledger.entries)
        seen.update(text=text, before=before, after=after)

    async def scenario() -> None:
        await asyncio.gather(*(d.run() for d in daemons.values()), scrape())

    asyncio.run(scenario())
    families = _samples(seen["text"])  # type: ignore[arg-type]
    scraped: dict[str, float] = defaultdict(float)
    for s in families["p2pmoe_sent_bytes"]:
        scraped[s.labels["kind"]] += s.value
    assert scraped and all(seen["before"][k] <= scraped[k] <= seen["after"][k] for k in scraped)  # type: ignore[index]
    assert any(s.labels["name"] == "accuracy" and s.value == 0.25 for s in families["p2pmoe_metric"])
    assert [s.value for s in families["p2pmoe_rounds_done"] if s.name == "p2pmoe_rounds_done_total"][0] >= 1
    compute = {s.labels["phase"]: s.value for s in families["p2pmoe_compute_seconds"] if s.name == "p2pmoe_compute_seconds_total"}
    assert compute["train"] >= 0.5 and "evaluate" in compute  # Slow trains 0.5 s a round
    assert [s.value for s in families["p2pmoe_refused_messages"] if s.name == "p2pmoe_refused_messages_total"] == [0]
    assert {s.name for s in families["p2pmoe_request_seconds"]} == {"p2pmoe_request_seconds_count", "p2pmoe_request_seconds_sum"}


def _by_kind(entries: list[LedgerEntry]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for e in list(entries):
        totals[e.kind] += e.total
    return totals
