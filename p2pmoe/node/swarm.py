"""`p2pmoe swarm`: N real daemon processes on loopback, then one run folder for all of them.

Each node gets a generated config, its own process and its own folder under <out>/nodes/<id>;
when all exit, their metrics and ledgers are merged into the same summary.json /
metrics.jsonl / ledger.csv that `p2pmoe simulate` writes, by the same summariser.
Thread budget: each process gets max(1, cores // processes) torch threads unless `threads`
says otherwise, so N processes never oversubscribe the machine's cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from p2pmoe.driver.summary import Row, client_holdings, make_summary
from p2pmoe.experiment import ResolvedExperiment
from p2pmoe.ledger import ByteLedger
from p2pmoe.naming import SERVER_ID
from p2pmoe.node.config import Timing
from p2pmoe.node.launch import start_node
from p2pmoe.report import write_report
from p2pmoe.report.folders import lan_summary
from p2pmoe.report.tables import round_ranges
from p2pmoe.runs import RunFolder, read_ledger, read_metrics
from p2pmoe.settings import ExperimentConfig


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _toml_table(name: str, values: dict[str, Any]) -> list[str]:
    return ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]


def thread_budget(cfg: ExperimentConfig, processes: int) -> int:
    """Torch threads per process: the config's `threads`, else the cores shared out."""
    return cfg.run.threads or max(1, (os.cpu_count() or 1) // max(processes, 1))


def write_node_configs(
    experiment: ResolvedExperiment, out: Path, timing: Timing, addresses: dict[str, str] | None = None, insecure: bool = False
) -> dict[str, Path]:
    """One node.toml per node under <out>/nodes/<id>/; by default on free loopback ports.
    `insecure` writes `insecure = true`: plaintext on addresses other machines can reach."""
    cfg, ids = experiment.cfg, experiment.node_ids
    if addresses is None:
        addresses = {n: f"tcp://127.0.0.1:{port}" for n, port in zip(ids, free_ports(len(ids)), strict=True)}
    data_root = str(Path(cfg.run.data_root).resolve()) if cfg.run.data_root else None  # node files resolve paths from their folder
    run = dataclasses.replace(cfg.run, threads=thread_budget(cfg, len(ids)), data_root=data_root)
    paths = {}
    for node, peer_list in experiment.links().items():
        folder = out / "nodes" / node
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f'node_id = "{node}"', f'bind = "{addresses[node]}"', 'out = "."', *(["insecure = true"] if insecure else []), "", "[peers]"]
        lines += [f'"{p}" = "{addresses[p]}"' for p in peer_list]
        lines += _toml_table("timing", dataclasses.asdict(timing))
        run_table = {k: v for k, v in run.to_dict().items() if k != "out"}  # a node's folder is its top-level `out`
        lines += _toml_table("run", run_table) + _toml_table("task", cfg.task.to_dict()) + _toml_table("method", cfg.method.to_dict())
        (folder / "node.toml").write_text("\n".join(lines) + "\n")
        paths[node] = folder / "node.toml"
    return paths


def merge_run(experiment: ResolvedExperiment, out: Path, wall_seconds: float, exit_codes: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Combine every node's metrics.jsonl and ledger.csv into the run folder's own files and
    summarise them as `simulate` does. Each row's bytes are recounted from the merged ledger
    (every message is recorded by its sender), so they mean what the simulator's rows mean."""
    cfg, task = experiment.cfg, experiment.task
    rows: list[Row] = []
    ledger = ByteLedger()
    parts = sorted((out / "nodes").iterdir())
    for part in parts:
        if (part / "metrics.jsonl").exists():
            rows += read_metrics(part / "metrics.jsonl")
        if (part / "ledger.csv").exists():
            for e in read_ledger(part / "ledger.csv"):
                ledger.record(e.round, e.src, e.dst, e.kind, e.header_bytes, e.payload_bytes, e.phase)
    rows.sort(key=lambda r: (r["round"], r["node"]))
    for row in rows:
        traffic = ledger.node_traffic(row["node"], row["round"])
        row["bytes_sent"], row["bytes_received"] = traffic["sent"], traffic["received"]
    clients = list(experiment.clients)
    holds = client_holdings(task, cfg, clients)
    run_folder = RunFolder(out, holds=holds)
    for row in rows:
        run_folder.log(row)
    run_folder.log_messages(ledger.entries)
    summary = make_summary(cfg, task, rows, ledger, clients, wall_seconds, "swarm")
    summary["nodes_finished"] = sorted({r["node"] for r in rows if r["round"] == cfg.run.rounds - 1 and r["node"] in clients})
    summary["exit_codes"] = exit_codes or {}
    lan = lan_summary(parts, rows)  # the daemons' node.json: when each started, whom it lost and found, what failed
    summary.update({key: lan[key] for key in ("started", "events", "failures") if key in lan})
    everyone = [*clients, *sorted({r["node"] for r in rows} - set(clients))]  # a node that ran no round is listed too
    summary["took_part"] = {node: round_ranges(r["round"] for r in rows if r["node"] == node) for node in everyone}
    run_folder.finish(summary)
    return summary


def _progress(out: Path, key: str | None) -> tuple[int, dict[str, str]]:
    """Node-rounds finished so far, from the nodes' metrics files, and the bar's postfix: MB
    sent so far and the mean of `key` over the clients of the latest round that has it. A line
    still being written is skipped until it is whole."""
    rows = []
    for metrics in (out / "nodes").glob("*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    post = {"MB": f"{sum(r.get('bytes_sent', 0) for r in rows) / 1e6:.1f}"}
    scored = [r for r in rows if r.get("node") != SERVER_ID and key in r.get("metrics", {})]
    if scored:
        latest = max(r["round"] for r in scored)
        values = [r["metrics"][key] for r in scored if r["round"] == latest]
        post[str(key)] = f"{sum(values) / len(values):.4f}"
    return len(rows), post


def run_swarm(experiment: ResolvedExperiment, timing: Timing, timeout: float | None = None, progress: bool = True, report: bool = True) -> dict[str, Any]:
    """Start every node, wait for all (stopping stragglers after `timeout`), merge results;
    with `report`, write the run's report (figures, index.html) into `<out>/report`."""
    cfg, task = experiment.cfg, experiment.task
    out = Path(cfg.run.out)
    started = time.perf_counter()
    configs = write_node_configs(experiment, out, timing)
    procs: dict[str, Any] = {}
    budget = timeout or timing.startup + cfg.run.rounds * timing.round_deadline + timing.linger + 60
    deadline = time.monotonic() + budget
    key = task.selection.key or task.metrics[0]
    bar: tqdm[Any] | None = None
    try:
        for node, path in configs.items():  # inside the try: nodes started before a failure are stopped below
            procs[node] = start_node(path, path.parent / "node.log")
        # after the forks: the bar's monitor thread is not copied into the nodes
        bar = tqdm(total=len(procs) * cfg.run.rounds, desc=f"{cfg.run.method} swarm", unit="node-round", disable=not progress)
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            done, post = _progress(out, key) if progress else (0, {})
            if done > bar.n:
                bar.set_postfix(post, refresh=False)
                bar.update(done - bar.n)
        late = [node for node, p in procs.items() if p.poll() is None]
        if late:
            print(f"swarm: {late} still running after {budget:.0f}s; stopping them", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    codes = {node: proc.returncode for node, proc in procs.items()}
    failed = {node: code for node, code in codes.items() if code != 0}
    if failed:
        print(f"swarm: nodes exited with errors {failed}; see {out}/nodes/<id>/node.log", file=sys.stderr)
    summary = merge_run(experiment, out, time.perf_counter() - started, codes)
    if report:
        write_report([out], echo=False)
    return summary
