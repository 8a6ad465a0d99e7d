"""The report's figures, drawn with matplotlib's Agg backend (no display needed).

Every function takes runs and a folder, writes PNGs there and returns them as `Figure`s whose
caption names the setting; the same caption is printed under the picture inside the PNG, so a
picture copied elsewhere still says what it shows. A figure with nothing to show is skipped.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from p2pmoe.naming import SERVER_ID  # noqa: E402
from p2pmoe.report.folders import (  # noqa: E402
    RunData,
    bytes_by_kind,
    diagnostics_of,
    diagnostics_round,
    gate_prefixes,
    gate_table,
    metric_against_bytes,
    run_labels,
    shared_setting,
    slug,
    spread_by_round,
    traffic_matrix,
)
from p2pmoe.report.seeds import compared_metric, draw_seeds, repeated, seed_groups  # noqa: E402
from p2pmoe.topology import load_topology, make_topology  # noqa: E402

MAX_PANELS = 8
"""Metrics (or domains) drawn per round at most (the headline metric first); the CSV has all
of them."""
MAX_NODES_DRAWN = 32
"""Clients the per-node figures (traffic matrix, expert graph, gate correlation) show at most.
More are unreadable, and drawing every one of 1,000 nodes took twice as long as the
accounting run itself (a 10,000-node traffic matrix alone is 10^8 cells)."""
DPI = 100
CAPTION_PT = 6.5
LEGEND_PT = 7
GAP_INCHES = 0.08
"""Space between the caption, the runs' legend and the panels."""


@dataclass(frozen=True)
class Figure:
    """A written picture: its file name inside the report folder, a title and a caption."""

    file: str
    title: str
    caption: str


def _caption(fig: Any, caption: str) -> Text:
    """The caption at the foot of `fig`, wrapped to lines whose drawn width fits the figure:
    measured, because a count of characters per inch cut off lines rich in digits, capitals
    and `=`."""
    renderer = fig.canvas.get_renderer()
    text = fig.text(0.01, 0.005, "", fontsize=CAPTION_PT, va="bottom", ha="left", color="0.3")
    chars = int(fig.get_size_inches()[0] * 24)
    while True:
        text.set_text("\n".join(textwrap.wrap(caption, chars, break_on_hyphens=False)))
        if text.get_window_extent(renderer).x1 <= 0.99 * fig.bbox.width or chars <= 20:
            return text
        chars -= max(1, chars // 20)


def _runs_legend(fig: Any, bottom: float) -> float:
    """The legend of every panel's lines, under the panels from `bottom` (a fraction of the
    figure's height) up, in as many columns as fit the width, labels wrapped if one column does
    not: a label names how its run differs from the others and can be wider than a panel.
    Returns the legend's top."""
    found: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle)
    if not found:
        return bottom
    renderer = fig.canvas.get_renderer()
    columns, chars = len(found), max(len(label) for label in found)
    while True:
        labels = ["\n".join(textwrap.wrap(label, chars, break_on_hyphens=False)) for label in found]
        legend = fig.legend(list(found.values()), labels, loc="lower left", bbox_to_anchor=(0.01, bottom), ncol=columns, fontsize=LEGEND_PT, frameon=False)
        box = legend.get_window_extent(renderer)
        if box.x1 <= 0.99 * fig.bbox.width or chars <= 20:
            return float(box.y1 / fig.bbox.height)
        legend.remove()
        if columns > 1:
            columns -= 1
        else:
            chars -= max(1, chars // 20)


def _save(fig: Any, out: Path, name: str, title: str, caption: str, runs_legend: bool = False) -> Figure:
    """Title, caption (and with `runs_legend`, the legend of the runs' lines) on `fig`, the
    panels laid out in the space left, written to `out/name`."""
    fig.suptitle(title, fontsize=11)
    gap = GAP_INCHES * fig.dpi / fig.bbox.height
    foot = _caption(fig, caption).get_window_extent(fig.canvas.get_renderer()).y1 / fig.bbox.height + gap
    if runs_legend:
        foot = _runs_legend(fig, foot) + gap
    fig.tight_layout(rect=(0, foot, 1, 0.96))
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return Figure(name, title, caption)


def _grid(count: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 0.5, height * rows + 0.9), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def metric_vs_bytes(runs: list[RunData], out: Path, name: str | None = None) -> list[Figure]:
    """The headline metric against cumulative bytes per client, one line per run (one figure
    per headline metric when runs differ in it); `name` names the file of a single figure."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        if run.headline:
            groups.setdefault(run.headline, []).append(run)
    figures = []
    for metric, group in groups.items():
        fig, ax = plt.subplots(figsize=(7.5, 5))
        spent: list[float] = []
        for i, (run, label) in enumerate(zip(group, run_labels(group), strict=True)):
            points = metric_against_bytes(run, metric)
            if points:
                xs, ys = zip(*points, strict=True)
                style = ("-", "--", ":")[(i // 10) % 3]  # the colour cycle has 10 colours: the 11th line gets a new style
                spent += [x / 1e6 for x in xs]
                ax.plot([x / 1e6 for x in xs], ys, marker="o", markersize=3, linestyle=style, label=label)
        # a log axis only when the runs' bytes span more than a decade and a half; plain numbers either way
        # (issue 29: a symlog axis under its linear threshold showed two ticks in scientific notation)
        if spent and min(spent) > 0 and max(spent) / min(spent) > 30:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("cumulative MB sent + received per client")
        ax.set_ylabel(f"{metric} (mean over clients)")
        ax.grid(alpha=0.3)
        file = (name or "metric_vs_bytes.png") if len(groups) == 1 else f"metric_vs_bytes_{slug(metric)}.png"
        caption = f"{metric} after each evaluated round against what a client has sent and received so far. {shared_setting(group)}."
        figures.append(_save(fig, out, file, f"{metric} against communication", caption, runs_legend=True))
    return figures


def _round_axis(ax: Any) -> None:
    """Rounds are whole numbers: ticks at 2.5-round steps name rounds that do not exist."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _per_round(runs: list[RunData], out: Path, section: str, names: list[str], name: str, title: str, what: str) -> list[Figure]:
    """One panel per name: each run's mean over clients per round, the min-max band shaded."""
    if not names:
        return []
    fig, axes = _grid(len(names))
    labels = run_labels(runs)
    for ax, metric in zip(axes, names, strict=True):
        for run, label in zip(runs, labels, strict=True):
            series = spread_by_round(run, section, metric)
            if series:
                rounds, mean, low, high = zip(*series, strict=True)
                (line,) = ax.plot(rounds, mean, marker="o", markersize=2.5, label=label)
                ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.15)
        ax.set_title(metric, fontsize=9)
        _round_axis(ax)
        ax.grid(alpha=0.3)
    caption = f"{what}: mean over clients, band from min to max over clients. {shared_setting(runs)}."
    return [_save(fig, out, name, title, caption, runs_legend=True)]


def headline_metrics(runs: list[RunData]) -> list[str]:
    """The metrics per round worth a panel, at most MAX_PANELS: each run's selection metric and
    its test counterpart (`valid_mrr`, `mrr`), the other test metrics, then validation ones;
    means over domains only, never one domain's value."""
    first = [r.headline for r in runs if r.headline]
    means = [n for r in runs for n in r.mean_metrics]
    tests = [n for n in means if not n.startswith("valid_")]
    shown = {*first, *means}
    return [n for n in dict.fromkeys([*first, *(h.removeprefix("valid_") for h in first), *tests, *means]) if n in shown][:MAX_PANELS]


def metrics_per_round(runs: list[RunData], out: Path) -> list[Figure]:
    """The headline evaluation metrics per round (`headline_metrics`)."""
    what = "Evaluation metrics (means over domains) per evaluated round"
    return _per_round(runs, out, "metrics", headline_metrics(runs), "metrics_per_round.png", "metrics per round", what)


def metrics_per_domain(runs: list[RunData], out: Path) -> list[Figure]:
    """One test metric per round for each domain (or task), where metrics have a breakdown: the
    selection metric's test counterpart, one panel per domain (at most MAX_PANELS)."""
    candidates = [m for r in runs if r.headline for m in (r.headline.removeprefix("valid_"), r.headline)]
    metric = next((m for m in candidates if any(r.parts_of(m) for r in runs)), None)
    if metric is None:
        return []
    names = sorted({name for r in runs for name in r.parts_of(metric).values()})
    what = f"{metric} of each domain per evaluated round" + (f" (the first {MAX_PANELS} of {len(names)} domains)" if len(names) > MAX_PANELS else "")
    return _per_round(runs, out, "metrics", names[:MAX_PANELS], "metrics_per_domain.png", f"{metric} per domain", what)


def train_loss_per_round(runs: list[RunData], out: Path) -> list[Figure]:
    """The training loss per round."""
    having = [r for r in runs if spread_by_round(r, "train", "train_loss")]
    if not having:
        return []
    return _per_round(having, out, "train", ["train_loss"], "train_loss.png", "training loss per round", "Training loss of each round's local epochs")


def _per_run(runs: list[RunData], draw: Callable[[Any, RunData], None], out: Path, name: str, title: str, caption: str) -> list[Figure]:
    """One panel per run that moved any bytes."""
    moving = [r for r in runs if r.ledger]
    if not moving:
        return []
    fig, axes = _grid(len(moving), 4.8, 3.8)
    for ax, run, label in zip(axes, moving, run_labels(moving), strict=True):
        draw(ax, run)
        ax.set_title(textwrap.fill(label, 60, break_on_hyphens=False), fontsize=9)  # 60 characters of 9 pt: a panel's width
    return [_save(fig, out, name, title, f"{caption} {shared_setting(moving)}.")]


def _draw_kinds(ax: Any, run: RunData) -> None:
    table = bytes_by_kind(run.ledger)
    rounds = sorted(table)
    kinds = sorted({k for kinds in table.values() for k in kinds})
    bottom = np.zeros(len(rounds))
    for kind in kinds:
        values = np.array([table[r].get(kind, 0) / 1e6 for r in rounds])
        ax.bar(rounds, values, bottom=bottom, label=kind)
        bottom += values
    _round_axis(ax)
    ax.set_ylabel("MB (all messages)")
    ax.legend(fontsize=6)


def bytes_per_round(runs: list[RunData], out: Path) -> list[Figure]:
    """Bytes of all messages per round, stacked by message kind."""
    caption = "Encoded bytes (header + payload) of every message in each round."
    return _per_run(runs, _draw_kinds, out, "bytes_by_kind.png", "bytes per round by message kind", caption)


def _draw_matrix(ax: Any, run: RunData) -> None:
    shown, note = _drawn(run)
    keep = {*shown, SERVER_ID}  # a coordinator's row and column stay in view
    nodes, matrix = traffic_matrix(e for e in run.ledger if e.src in keep and e.dst in keep)
    values = np.array(matrix, dtype=float) / 1e6
    image = ax.imshow(values, cmap="viridis")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, label="MB")
    ticks = range(len(nodes))
    ax.set_xticks(ticks, nodes, rotation=90, fontsize=6)
    ax.set_yticks(ticks, nodes, fontsize=6)
    ax.set_xlabel(f"to{note}")
    ax.set_ylabel("from")
    if len(nodes) <= 12:
        for i in ticks:
            for j in ticks:
                if values[i, j]:
                    dark = values[i, j] < 0.6 * values.max()
                    ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=6, color="w" if dark else "k")


def traffic(runs: list[RunData], out: Path) -> list[Figure]:
    """Who sent how many bytes to whom over the whole run."""
    caption = "MB each node (row) sent to each node (column) over the run, from the ledger."
    return _per_run(runs, _draw_matrix, out, "traffic_matrix.png", "traffic between peers", caption)


def sim_time(runs: list[RunData], out: Path) -> list[Figure]:
    """Simulated seconds messages spend on the topology's links per round (simulate only)."""
    timed = [r for r in runs if r.summary.get("sim_seconds", {}).get("by_round")]
    if not timed:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run, label in zip(timed, run_labels(timed), strict=True):
        by_round = run.summary["sim_seconds"]["by_round"]
        ax.plot(range(len(by_round)), by_round, marker="o", markersize=3, label=label)
    _round_axis(ax)
    ax.set_ylabel("simulated communication seconds")
    ax.grid(alpha=0.3)
    bandwidth = {r.run_setting.get("link_bandwidth") for r in timed}
    caption = (
        f"Time messages spend on the links per round (fluid model; phases sequential), links of {', '.join(f'{b:g}' for b in bandwidth if b)} "
        f"bit/s unless the topology file says otherwise. {shared_setting(timed)}."
    )
    return [_save(fig, out, "sim_time.png", "simulated time per round", caption, runs_legend=True)]


@lru_cache(maxsize=4)
def _rebuilt_topology(kind: str, nodes: int | None, seed: int) -> nx.Graph:
    """A run's topology rebuilt from its setting (once per report: three figures use it); an
    empty graph when a topology file is not on this machine."""
    try:
        if Path(kind).suffix in (".json", ".edges", ".txt"):
            return load_topology(kind, nodes)
        return make_topology(kind, nodes, seed) if nodes is not None and nodes > 1 else nx.Graph()
    except (ValueError, OSError):  # a topology file not on this machine: positions still help
        return nx.Graph()


def _topology(run: RunData) -> nx.Graph:
    setting = run.run_setting
    nodes = setting.get("nodes", len(run.clients))
    return _rebuilt_topology(str(setting.get("topology", "full")), None if nodes is None else int(nodes), int(setting.get("seed", 0)))


def _drawn(run: RunData) -> tuple[list[str], str]:
    """The clients the per-node figures show, and what to say when that is not all of them:
    up to MAX_NODES_DRAWN clients found breadth first on the topology from the first, so the
    arrows and blocks drawn are those between neighbours (the first clients by name where the
    topology is unknown or too small a component)."""
    clients = run.clients
    if len(clients) <= MAX_NODES_DRAWN:
        return clients, ""
    graph = _topology(run)
    near = [clients[0], *islice((v for _, v in nx.bfs_edges(graph, clients[0])), 2 * MAX_NODES_DRAWN)] if clients[0] in graph else []
    members = set(clients)
    shown = list(dict.fromkeys(n for n in [*near, *clients[:MAX_NODES_DRAWN]] if n in members))[:MAX_NODES_DRAWN]
    return sorted(shown), f" ({len(shown)} of {len(clients):,} clients: {clients[0]} and its nearest)"


def _layout(run: RunData, nodes: list[str]) -> tuple[nx.Graph, dict[str, Any]]:
    """Positions of `nodes` on the run's topology: a circle for full, ring and star graphs, a
    seeded spring layout otherwise; a topology that cannot be rebuilt gives a circle."""
    kind = str(run.run_setting.get("topology", "full"))
    graph = nx.Graph(_topology(run).subgraph(nodes))
    graph.add_nodes_from(nodes)
    regular = kind.split(":")[0] in ("full", "ring", "star") or graph.number_of_edges() == 0
    positions = nx.circular_layout(sorted(graph.nodes)) if regular else nx.spring_layout(graph, seed=0)
    return graph, positions


def expert_graph(run: RunData, out: Path) -> list[Figure]:
    """FedMoE-DA's expert selection in one round: an arrow from each peer an expert was pulled
    from to the node that pulled it, width by the largest weight it got in that node's plan."""
    chosen = diagnostics_round(run, "plan_weights")
    if chosen is None:
        return []
    shown, note = _drawn(run)
    plans = {node: diag for node, diag in diagnostics_of(run, chosen).items() if node in set(shown)}
    graph, pos = _layout(run, shown)
    fig, ax = plt.subplots(figsize=(7, 6.5))
    nx.draw_networkx_edges(graph, pos, ax=ax, edge_color="0.85", width=0.8)
    pulled, slots = 0, set()
    for dst, diag in plans.items():
        weights = np.array(diag.get("plan_weights", []), dtype=float)
        for m, (src, slot) in enumerate(diag.get("plan_sources", [])):
            if src == dst or weights.size == 0 or not weights[:, m].any() or src not in pos:
                continue
            pulled += 1
            slots.add(int(slot))
            ax.annotate(
                "",
                xy=pos[dst],
                xytext=pos[src],
                arrowprops={
                    "arrowstyle": "-|>",
                    "lw": 0.4 + 4 * float(weights[:, m].max()),
                    "alpha": 0.6,
                    "shrinkA": 8,
                    "shrinkB": 8,
                    "connectionstyle": f"arc3,rad={0.08 + 0.07 * int(slot)}",
                    "color": f"C{int(slot) % 10}",
                },
            )
    xy = np.array([pos[n] for n in shown])
    ax.scatter(xy[:, 0], xy[:, 1], s=120, color="k", zorder=3)
    for node in shown:
        ax.annotate(node, pos[node], xytext=(6, 6), textcoords="offset points", fontsize=8)
    handles = [Line2D([], [], color=f"C{s % 10}", lw=2, label=f"slot {s}") for s in sorted(slots)]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="lower left", title="expert", title_fontsize=7)
    ax.set_axis_off()
    caption = (
        f"Round {chosen}: {pulled} experts pulled{note}. An arrow goes from the peer that served an expert to the node that "
        f"aggregated it, coloured by the expert's slot, width by the largest aggregation weight it got in that node's plan; "
        f"grey lines are the topology. {run.setting_text()}."
    )
    return [_save(fig, out, f"expert_graph_{slug(run.label)}.png", f"expert selection ({run.label})", caption)]


def gate_correlation(run: RunData, out: Path) -> list[Figure]:
    """Cosine similarity between every node's expert proxies (rows of its gate) in one round:
    the quantity FedMoE-DA selects experts by."""
    chosen = diagnostics_round(run, "gate")
    if chosen is None:
        return []
    shown, note = _drawn(run)
    wanted = set(shown)
    gates = {node: np.array(d["gate"], dtype=float) for node, d in sorted(diagnostics_of(run, chosen).items()) if d.get("gate") and node in wanted}
    rows = np.concatenate(list(gates.values()))
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="cosine similarity")
    sizes = [len(g) for g in gates.values()]
    edges = np.cumsum(sizes)
    for edge in edges[:-1]:
        ax.axhline(edge - 0.5, color="k", lw=0.5)
        ax.axvline(edge - 0.5, color="k", lw=0.5)
    middles = edges - np.array(sizes) / 2 - 0.5
    ax.set_xticks(middles, [run.named(n) for n in gates], rotation=90, fontsize=7)
    ax.set_yticks(middles, [run.named(n) for n in gates], fontsize=7)
    caption = (
        f"Round {chosen}: cosine similarity between the expert proxies (rows of each node's gate, "
        f"{sizes[0]} per node, in slot order) of every node{note}. {run.setting_text()}."
    )
    return [_save(fig, out, f"gate_correlation_{slug(run.label)}.png", f"gate correlation ({run.label})", caption)]


def gate_weights(run: RunData, out: Path) -> list[Figure]:
    """Each client's mean gate (or alpha) weight per expert or domain at the selected round,
    so a gate that collapses onto one branch shows as one bright column."""
    chosen = run.selected_round
    figures: list[Figure] = []
    for prefix in gate_prefixes(run) if chosen is not None else []:
        assert chosen is not None
        clients, columns, values = gate_table(run, prefix, chosen)
        fig, ax = plt.subplots(figsize=(max(6.0, 3.2 + 0.7 * len(columns)), 3.0 + 0.45 * len(clients)))
        image = ax.imshow(np.array(values), cmap="magma", vmin=0, aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.046)
        held = list(run.holds.values())  # index i of a per-domain weight is client i's domain
        ax.set_xticks(range(len(columns)), [held[int(c)] if c.isdigit() and int(c) < len(held) else c for c in columns], fontsize=7)
        ax.set_yticks(range(len(clients)), [run.named(c) for c in clients], fontsize=7)
        ax.set_xlabel(prefix.rstrip("/") + " index")
        top = max((v for row in values for v in row if v == v), default=1.0)  # v == v skips NaN
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="k" if value > 0.6 * top else "w")
        name = prefix.rstrip("/")
        caption = f"Round {chosen}: each client's mean {name} weight per index (metric names {prefix}<i>). {run.setting_text()}."
        figures.append(_save(fig, out, f"{slug(name)}_{slug(run.label)}.png", f"{name} per client ({run.label})", caption))
    return figures


def node_timeline(run: RunData, out: Path) -> list[Figure]:
    """A daemon run's nodes over wall time: a mark where each finished a round (the gaps are
    round durations), and where a peer declared it gone or back (from the nodes' node.json).
    Only runs whose rows carry wall times (swarm and LAN daemons)."""
    started = run.summary.get("started")
    timed = [r for r in run.rows if isinstance(r.get("time"), int | float)]
    if not timed or not isinstance(started, int | float):
        return []
    nodes = sorted({r["node"] for r in timed} | set(run.summary.get("took_part", {})))
    place = {node: i for i, node in enumerate(nodes)}
    fig, ax = plt.subplots(figsize=(9.0, 1.6 + 0.42 * len(nodes)))
    for node in nodes:
        ends = sorted((r["time"] - started, r["round"]) for r in timed if r["node"] == node)
        if ends:
            ax.plot([t for t, _ in ends], [place[node]] * len(ends), "-o", color="tab:blue", markersize=4, linewidth=1)
            last_time, last_round = ends[-1]
            done = f"{len(ends)} round{'s' if len(ends) != 1 else ''}"
            ax.annotate(f"{done} (last {last_round})", (last_time, place[node]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    styles = {"lost": ("x", "tab:red", "declared gone by a peer"), "back": ("o", "tab:green", "back, per a peer")}
    shown: set[str] = set()
    for events in run.summary.get("events", {}).values():
        for event in events:
            style = styles.get(event.get("event"))
            if style is None or event.get("peer") not in place or not isinstance(event.get("time"), int | float):
                continue
            marker, color, label = style
            ax.plot(event["time"] - started, place[event["peer"]], marker, color=color, markersize=9, mfc="none", label=None if label in shown else label)
            shown.add(label)
    ax.set_yticks(range(len(nodes)), nodes, fontsize=7)
    ax.set_xlabel("wall seconds since the first node started")
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.12, y=0.2)  # room for the labels at the right end of each line
    if shown:
        ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    caption = f"Blue marks: a node finished a round (the gap before it is that round's duration). {run.setting_text()}."
    return [_save(fig, out, f"timeline_{slug(run.label)}.png", f"node timeline ({run.label})", caption)]


def seed_spread(runs: list[RunData], out: Path) -> list[Figure]:
    """Runs repeated over seeds: each group's mean with a dot per seed, and the first group's
    per-node differences against the others (only when some group has several seeds)."""
    groups, metric = seed_groups(runs), compared_metric(runs)
    if not repeated(groups) or metric is None:
        return []
    first = next(iter(groups))
    draw_seeds(groups, [metric], first, out, "seeds.png", f"{metric} over seeds")
    caption = f"Left: mean over seeds of {metric} in the selected round, a dot per seed. Right: {first} minus each other group, per node and seed."
    return [Figure("seeds.png", f"{metric} over seeds", caption)]


ACROSS_RUNS = (metric_vs_bytes, metrics_per_round, metrics_per_domain, train_loss_per_round, bytes_per_round, traffic, sim_time, seed_spread)
PER_RUN = (expert_graph, gate_correlation, gate_weights, node_timeline)


def draw_all(runs: list[RunData], out: Path) -> list[Figure]:
    """Every figure that applies to `runs`."""
    figures = [f for draw in ACROSS_RUNS for f in draw(runs, out)]
    return figures + [f for run in runs for draw in PER_RUN for f in draw(run, out)]
