"""Run folders read back for a report, and the per-round figures derived from them.

A report reads only what a run wrote (summary.json, metrics.jsonl, ledger.csv), so it works on
a `simulate` or `swarm` folder, on a LAN run whose per-node folders were gathered under one
folder, and on runs made by older versions, without building any model.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pmoe.ledger import LedgerEntry
from p2pmoe.naming import SERVER_ID
from p2pmoe.report.tables import GATE_PREFIXES, breakdown, mean_metric_names, metric_order, round_ranges
from p2pmoe.runs import NODE_FILE, read_ledger, read_metrics

UNCOMPARED = frozenset({"out"})
"""Setting keys that differ between any two runs without making them different experiments:
the run folder, which the label already names."""
PATH_OPTIONS = frozenset({"data_root"})
"""Setting keys whose value is a path of the machine that ran: a label names its last part."""


@dataclass
class RunData:
    """One run as a report sees it: its summary (empty for gathered LAN folders, which have
    none), every metrics row and every ledger message."""

    path: Path
    label: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    ledger: list[LedgerEntry]
    clients: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.clients = sorted({row["node"] for row in self.rows if row["node"] != SERVER_ID})

    @property
    def run_setting(self) -> dict[str, Any]:
        """The `[run]` table of the setting (empty when the folder has no summary)."""
        return dict(self.summary.get("setting", {}).get("run", {}))

    @property
    def rounds(self) -> list[int]:
        return sorted({row["round"] for row in self.rows})

    @property
    def metric_names(self) -> list[str]:
        """Evaluation metrics the clients logged, gate/alpha weights left out (the report draws
        each as a client × index heatmap), `hr@5` before `hr@10`."""
        names = {name for row in self.client_rows() for name in row.get("metrics", {})}
        return sorted((n for n in names if not n.startswith(GATE_PREFIXES)), key=metric_order)

    @property
    def mean_metrics(self) -> list[str]:
        """The metrics that are not one domain's (or task's) value: what runs are compared by."""
        return mean_metric_names(self.metric_names)

    def parts_of(self, metric: str) -> dict[str, str]:
        """part (domain or task) -> the name under which `metric`'s value for it is logged."""
        means = set(self.mean_metrics)
        found = ((breakdown(name, means), name) for name in self.metric_names)
        return {split[0]: name for split, name in found if split is not None and split[1] == metric}

    @property
    def headline(self) -> str | None:
        """The metric a reader compares runs by: the task's selection key, else `accuracy`,
        else the first metric logged."""
        key = self.summary.get("selection", {}).get("key")
        names = self.metric_names
        if key in names:
            return str(key)
        return "accuracy" if "accuracy" in names else (names[0] if names else None)

    @property
    def selected_round(self) -> int | None:
        """The round summary.json reports, else the last round with metrics."""
        chosen = self.summary.get("selection", {}).get("round")
        if chosen is not None:
            return int(chosen)
        evaluated = [row["round"] for row in self.client_rows() if row.get("metrics")]
        return max(evaluated) if evaluated else None

    @property
    def holds(self) -> dict[str, str]:
        """Client -> the domain or scenario it holds (empty when clients are anonymous parts)."""
        return dict(self.summary.get("holds", {}))

    def named(self, node: str) -> str:
        """A client as people read it: `node-00 (Books)` when it holds a named domain."""
        held = self.holds.get(node)
        return f"{node} ({held})" if held else node

    def client_rows(self, round_index: int | None = None) -> list[dict[str, Any]]:
        """Rows of clients (not the server), of one round or all."""
        return [r for r in self.rows if r["node"] != SERVER_ID and (round_index is None or r["round"] == round_index)]

    def setting_parts(self) -> dict[str, str]:
        """The setting as labelled phrases (method, data, nodes, partition, rounds, ...)."""
        setting = self.summary.get("setting", {})
        run, task, method = self.run_setting, setting.get("task", {}), setting.get("method", {})
        if not run:
            return {"setting": f"{len(self.clients)} clients, {len(self.rounds)} rounds (no summary.json: setting unknown)"}
        unused = set(self.summary.get("unused_run_options", ()))  # the family never read them: not part of the setting
        parts = {
            "method": str(run.get("method")),
            "model": f"model {task['model']}" if "model" in task else "",
            "data": f"data {run.get('data')}",
            "nodes": f"{run.get('nodes')} nodes",
            "partition": "" if "partition" in unused else str(run.get("partition", "")),
            "rounds": f"{run.get('rounds')} rounds x {run.get('local_epochs', 1)} epoch(s)",
            "topology": f"topology {run.get('topology')}",
            "seed": f"seed {run.get('seed')}",
        }
        if run.get("max_train_per_node") and "max_train_per_node" not in unused:
            parts["max_train_per_node"] = f"max {run['max_train_per_node']} train/node"
        if "embed_dim" in task:
            parts["embed_dim"] = f"hidden {task['embed_dim']}"
        if method:
            parts["method_options"] = "[method] " + " ".join(f"{k}={v}" for k, v in method.items())
        return parts

    def setting_text(self) -> str:
        """One line naming the setting and the run's wall time, for captions."""
        text = ", ".join(p for p in self.setting_parts().values() if p)
        wall = self.summary.get("wall_seconds")
        return text if wall is None else f"{text}, {self.summary.get('driver', 'run')} {wall / 60:.1f} min wall"

    def setting_values(self) -> dict[str, str]:
        """Every option of the setting ([run], [task], [method]) as key -> value text; a key
        that an earlier table already has is qualified by its table (`method.experts`)."""
        values: dict[str, str] = {}
        for section, options in self.summary.get("setting", {}).items():
            for key, value in options.items():
                name = key if key not in values else f"{section}.{key}"
                if isinstance(value, float):
                    values[name] = f"{value:g}"
                else:
                    values[name] = Path(value).name if key in PATH_OPTIONS and value else str(value)
        return values


def differences(runs: list[RunData]) -> list[dict[str, str]]:
    """Per run, the options whose value is not the same in every run that has the option.

    An option only some runs have (a task or method option) counts among those: the runs
    without it differ in the data or the method, which is itself named."""
    each = [{k: v for k, v in r.setting_values().items() if k not in UNCOMPARED} for r in runs]
    keys = dict.fromkeys(k for values in each for k in values)
    differ = [k for k in keys if len({values[k] for values in each if k in values}) > 1]
    return [{k: values[k] for k in differ if k in values} for values in each]


def run_labels(runs: list[RunData]) -> list[str]:
    """Each run's label followed by the options on which it differs from the other `runs`
    (`r_sas (model=sasrec-single)`), for legends and tables: folder names alone say nothing
    about how runs differ, and the method alone does not tell SyNCRec from SASRec."""
    return [f"{r.label} ({', '.join(f'{k}={v}' for k, v in d.items())})" if d else r.label for r, d in zip(runs, differences(runs), strict=True)]


def shared_setting(runs: list[RunData]) -> str:
    """The setting runs share, and each run's values of the options that differ (for a figure
    over several runs)."""
    if len(runs) == 1:
        return runs[0].setting_text()
    each = [r.setting_parts() for r in runs]
    keys = list(dict.fromkeys(k for parts in each for k in parts))
    same = [k for k in keys if all(parts.get(k) == each[0].get(k) for parts in each)]
    text = ", ".join(each[0][k] for k in same if each[0].get(k))
    differ = [label for label, d in zip(run_labels(runs), differences(runs), strict=True) if d]
    differ += [f"{r.label}: {r.setting_text()}" for r in runs if not r.run_setting]  # no summary.json: no options to compare
    return f"{text}; differs: {'; '.join(differ)}" if differ else text


def _gathered(path: Path) -> list[Path]:
    """Per-node folders under `path` (or `path/nodes`), as a LAN run's are when gathered."""
    for base in (path, path / "nodes"):
        found = sorted(p for p in base.iterdir() if (p / "metrics.jsonl").exists()) if base.is_dir() else []
        if found:
            return found
    return []


def is_node_folder(path: str | Path) -> bool:
    """A daemon's own run folder (node.json, no summary.json): one part of a LAN run."""
    return (Path(path) / NODE_FILE).exists() and not (Path(path) / "summary.json").exists()


def _node_file(part: Path) -> dict[str, Any]:
    try:
        found = json.loads((part / NODE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def lan_summary(parts: Sequence[Path], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What summary.json would say of a LAN run, from its daemons' node.json files: the setting,
    the wall time from the first start to the last finish, who ran which rounds, who finished,
    what each node lost and found, and each node's failures. Empty without node files (folders
    of an older build): the report then says that the setting is unknown."""
    nodes = {part: _node_file(part) for part in parts}
    known = {part: node for part, node in nodes.items() if node.get("setting")}
    if not known:
        return {}
    hashes = {node.get("config_hash") for node in known.values()}
    if len(hashes) > 1:
        by_hash = sorted(f"{part.name}: {str(node.get('config_hash'))[:12]}" for part, node in known.items())
        raise ValueError(f"these node folders are not one experiment (config hashes differ): {'; '.join(by_hash)}")
    setting = next(iter(known.values()))["setting"]
    rounds = int(setting.get("run", {}).get("rounds", 0))
    starts = [float(n["started"]) for n in known.values() if isinstance(n.get("started"), int | float)]
    ends = [float(n["finished"]) for n in known.values() if isinstance(n.get("finished"), int | float)]
    ends += [float(r["time"]) for r in rows if isinstance(r.get("time"), int | float)]
    took_part = {str(n.get("node", p.name)): round_ranges(r["round"] for r in rows if r["node"] == n.get("node", p.name)) for p, n in known.items()}
    return {
        "method": setting.get("run", {}).get("method"),
        "rounds": rounds,
        "driver": "lan",
        "setting": setting,
        "wall_seconds": max(ends) - min(starts) if starts and ends else None,
        "started": min(starts) if starts else None,
        "took_part": took_part,
        "nodes_finished": sorted(node for node, ran in took_part.items() if ran.endswith(str(rounds - 1)) and rounds),
        "events": {str(n.get("node", p.name)): n.get("events", []) for p, n in known.items()},
        "failures": {str(n.get("node", p.name)): n["failures"] for p, n in known.items() if n.get("failures")},
    }


def gathered_run(parts: Sequence[Path], path: Path, label: str | None = None) -> RunData:
    """One run from its per-node folders (each message is in its sender's ledger only, so the
    ledgers are concatenated)."""
    rows = sorted((row for part in parts for row in read_metrics(part / "metrics.jsonl")), key=lambda r: (r["round"], r["node"]))
    ledger = [e for part in parts if (part / "ledger.csv").exists() for e in read_ledger(part / "ledger.csv")]
    return RunData(path, label or path.resolve().name, lan_summary(parts, rows), rows, ledger)


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Read a run folder; without summary.json, merge the per-node folders under it."""
    path = Path(path)
    if (path / "summary.json").exists():
        summary = json.loads((path / "summary.json").read_text())
        rows = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
        ledger = read_ledger(path / "ledger.csv") if (path / "ledger.csv").exists() else []
        return RunData(path, label or path.resolve().name, summary, rows, ledger)
    parts = _gathered(path)
    if not parts:
        raise ValueError(f"{path}: not a run folder (no summary.json, and no per-node folders with metrics.jsonl)")
    return gathered_run(parts, path, label)


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """The runs `paths` name: run folders, parents of per-node folders, and the per-node
    folders of one LAN run given one by one (`p2pmoe report runs/node-*`), merged into one run
    labelled by their common parent."""
    nodes = [Path(p) for p in paths if is_node_folder(p)]
    runs = [load_run(p) for p in paths if not is_node_folder(p)]
    if nodes:
        parent = Path(os.path.commonpath([str(p.resolve()) for p in nodes]))
        runs.append(gathered_run(nodes, parent if len(nodes) > 1 else nodes[0], f"{parent.name or 'lan'} (LAN, {len(nodes)} nodes)"))
    return runs


def slug(text: str) -> str:
    """A file-name-safe spelling of a run label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def spread_by_round(run: RunData, section: str, name: str) -> list[tuple[int, float, float, float]]:
    """(round, mean, min, max) over clients of `row[section][name]`, for rounds that have it."""
    values: dict[int, list[float]] = defaultdict(list)
    for row in run.client_rows():
        value = row.get(section, {}).get(name)
        if isinstance(value, int | float):
            values[row["round"]].append(float(value))
    return [(r, statistics.fmean(v), min(v), max(v)) for r, v in sorted(values.items())]


def client_bytes_by_round(run: RunData) -> dict[int, float]:
    """Bytes a client sends plus receives in each round, mean over clients (from the ledger:
    the figure summary.json's `per_node_per_round` averages over rounds)."""
    members = set(run.clients)
    per_round: dict[int, float] = defaultdict(float)
    for e in run.ledger:
        per_round[e.round] += ((e.src in members) + (e.dst in members)) * e.total
    scale = 1.0 / len(members) if members else 0.0
    return {r: per_round.get(r, 0.0) * scale for r in run.rounds}


def metric_against_bytes(run: RunData, metric: str) -> list[tuple[float, float]]:
    """(cumulative bytes per client, mean metric) after each round that evaluated `metric`."""
    means = {r: mean for r, mean, _, _ in spread_by_round(run, "metrics", metric)}
    points, total = [], 0.0
    for r, spent in sorted(client_bytes_by_round(run).items()):
        total += spent
        if r in means:
            points.append((total, means[r]))
    return points


def bytes_by_kind(entries: Iterable[LedgerEntry]) -> dict[int, dict[str, int]]:
    """round -> message kind -> bytes, over every message."""
    table: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in entries:
        table[e.round][e.kind] += e.total
    return {r: dict(kinds) for r, kinds in sorted(table.items())}


def traffic_matrix(entries: Iterable[LedgerEntry]) -> tuple[list[str], list[list[int]]]:
    """Nodes (sorted) and bytes[src][dst]: who sent how much to whom over the whole run."""
    entries = list(entries)
    nodes = sorted({e.src for e in entries} | {e.dst for e in entries})
    index = {n: i for i, n in enumerate(nodes)}
    matrix = [[0] * len(nodes) for _ in nodes]
    for e in entries:
        matrix[index[e.src]][index[e.dst]] += e.total
    return nodes, matrix


def gate_prefixes(run: RunData) -> list[str]:
    """The GATE_PREFIXES this run logged metrics under."""
    names = {name for row in run.client_rows() for name in row.get("metrics", {})}
    return [p for p in GATE_PREFIXES if any(n.startswith(p) for n in names)]


def gate_table(run: RunData, prefix: str, round_index: int) -> tuple[list[str], list[str], list[list[float]]]:
    """Clients, the indices after `prefix` (in natural order) and each client's values in
    `round_index` (NaN where a client did not log one)."""
    metrics = {row["node"]: row.get("metrics", {}) for row in run.client_rows(round_index)}
    columns = sorted({n[len(prefix) :] for m in metrics.values() for n in m if n.startswith(prefix)}, key=lambda c: (len(c), c))
    clients = sorted(metrics)
    return clients, columns, [[float(metrics[c].get(prefix + col, float("nan"))) for col in columns] for c in clients]


def diagnostics_round(run: RunData, key: str) -> int | None:
    """The round whose diagnostics to draw: the selected one if it has `key`, else the last
    that has."""
    have = sorted({row["round"] for row in run.client_rows() if key in row.get("diagnostics", {})})
    if not have:
        return None
    chosen = run.selected_round
    return chosen if chosen in have else have[-1]


def diagnostics_of(run: RunData, round_index: int) -> dict[str, dict[str, Any]]:
    """node -> the diagnostics it logged in `round_index`."""
    return {row["node"]: row["diagnostics"] for row in run.client_rows(round_index) if row.get("diagnostics")}


def long_rows(run: RunData) -> list[dict[str, Any]]:
    """The per-round table in long format (run, round, node, section, name, value): one line
    per training statistic, metric and byte count, for pandas."""
    out = []
    for row in run.rows:
        base = {"run": run.label, "round": row["round"], "node": row["node"]}
        for section in ("train", "metrics"):
            out += [{**base, "section": section, "name": k, "value": v} for k, v in row.get(section, {}).items()]
        out += [{**base, "section": "bytes", "name": k, "value": row[k]} for k in ("bytes_sent", "bytes_received") if k in row]
    return out
