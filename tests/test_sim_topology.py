import json
from pathlib import Path

import networkx as nx
import pytest

from p2pmoe.naming import client_ids
from p2pmoe.topology import (
    TopologyError,
    load_topology,
    make_topology,
    metropolis_hastings_weights,
    neighbours_within,
    save_topology,
    write_topology,
)

TOPOLOGY_DIR = Path(__file__).resolve().parent.parent / "topology"
COMMITTED = {
    "full-10.json": 10,
    "ring-10.json": 10,
    "star-10.json": 10,
    "random-regular-3-10.json": 10,
    "small-world-4-0.2-10.json": 10,
    "erdos-renyi-0.3-10.json": 10,
    "ring-100.json": 100,
    "random-regular-4-100.json": 100,
}


def _degrees(graph):
    return sorted(d for _, d in graph.degree())


@pytest.mark.parametrize(
    "kind, nodes, degrees",
    [
        ("full", 10, [9] * 10),
        ("ring", 10, [2] * 10),
        ("star", 10, [1] * 9 + [9]),
        ("random-regular:3", 10, [3] * 10),
        ("random-regular:4", 100, [4] * 100),
        ("ring", 100, [2] * 100),
    ],
)
def test_kinds_have_their_degrees(kind, nodes, degrees):
    graph = make_topology(kind, nodes)
    assert list(graph) == client_ids(nodes)
    assert nx.is_connected(graph)
    assert _degrees(graph) == degrees


@pytest.mark.parametrize("kind", ["small-world:4:0.2", "erdos-renyi:0.3", "erdos-renyi:0.15", "random-regular:2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_kinds_are_connected_and_reproducible(kind, seed):
    graph = make_topology(kind, 12, seed=seed)
    assert nx.is_connected(graph)
    assert sorted(graph.edges) == sorted(make_topology(kind, 12, seed=seed).edges)
    if kind.startswith("small-world"):
        assert graph.number_of_edges() == 12 * 4 // 2  # rewiring moves edges, never adds or drops them


def test_star_hub_is_node_00_and_links_carry_attributes():
    graph = make_topology("star", 5, bandwidth=1e9, latency=0.002)
    assert graph.degree("node-00") == 4
    assert graph.graph["name"] == "star-5"
    assert all(d == {"bandwidth": 1e9, "latency": 0.002} for _, _, d in graph.edges(data=True))
    assert make_topology("small-world:4:0.20", 10).graph["name"] == "small-world-4-0.2-10"


@pytest.mark.parametrize(
    "kind, nodes, message",
    [
        ("mesh", 10, "unknown topology kind 'mesh'"),
        ("ring:3", 10, "expected 'ring'"),
        ("random-regular", 10, "expected 'random-regular:D'"),
        ("random-regular:x", 10, "degree D must be an integer"),
        ("random-regular:3", 9, "D \\* nodes even"),
        ("random-regular:1", 10, "no connected graph in 100 draws"),
        ("small-world:3:0.1", 10, "K even"),
        ("small-world:4:1.5", 10, "0 <= P <= 1"),
        ("erdos-renyi:0", 10, "0 < P <= 1"),
        ("erdos-renyi:0.01", 50, "raise P"),
        ("ring", 2, "at least 3 nodes"),
        ("full", 1, "at least 2 nodes"),
    ],
)
def test_bad_kinds_are_explained(kind, nodes, message):
    with pytest.raises(TopologyError, match=message):
        make_topology(kind, nodes)


def test_bad_link_values_are_refused():
    with pytest.raises(TopologyError, match="bandwidth must be > 0"):
        make_topology("ring", 4, bandwidth=0)
    with pytest.raises(TopologyError, match="latency must be >= 0"):
        make_topology("ring", 4, latency=-1)


def test_neighbours_within_one_and_two_hops_on_a_ring():
    ring = make_topology("ring", 10)
    assert neighbours_within(ring, "node-00", 1) == ["node-01", "node-09"]
    assert neighbours_within(ring, "node-00", 2) == ["node-01", "node-02", "node-08", "node-09"]
    assert neighbours_within(ring, "node-05", 5) == [n for n in client_ids(10) if n != "node-05"]
    with pytest.raises(ValueError, match="hops must be an integer >= 1"):
        neighbours_within(ring, "node-00", 0)
    with pytest.raises(TopologyError, match="not a node"):
        neighbours_within(ring, "node-10", 1)


@pytest.mark.parametrize("kind", ["star", "erdos-renyi:0.3", "small-world:4:0.2", "ring"])
def test_metropolis_hastings_weights_are_stochastic_and_symmetric(kind):
    graph = make_topology(kind, 10, seed=1)
    weights = {}
    for k in graph:
        own, row = metropolis_hastings_weights(graph.degree(k), {j: graph.degree(j) for j in graph[k]})
        weights[k] = {**row, k: own}
    for k, row in weights.items():
        assert set(row) == set(graph[k]) | {k}
        assert sum(row.values()) == pytest.approx(1.0)
        assert all(w > 0 for w in row.values())
        for j, w in row.items():
            if j != k:
                assert weights[j][k] == w


def test_metropolis_hastings_weights_by_hand_and_with_a_silent_partner():
    # a star of 4: hub degree 3, leaves degree 1
    assert metropolis_hastings_weights(1, {"node-00": 3}) == (0.75, {"node-00": 0.25})
    assert metropolis_hastings_weights(3, {"node-01": 1, "node-02": 1, "node-03": 1}) == (0.25, {"node-01": 0.25, "node-02": 0.25, "node-03": 0.25})
    assert metropolis_hastings_weights(3, {"node-02": 1}) == (0.75, {"node-02": 0.25})  # the others' weight stays with the hub


@pytest.mark.parametrize("suffix", [".json", ".edges"])
def test_save_load_round_trip(tmp_path, suffix):
    graph = make_topology("erdos-renyi:0.4", 12, seed=3, bandwidth=2.5e8, latency=0.001)
    path = save_topology(graph, tmp_path / f"er{suffix}")
    loaded = load_topology(path, nodes=12)
    assert sorted(loaded.nodes) == sorted(graph.nodes)
    assert {frozenset(e) for e in loaded.edges} == {frozenset(e) for e in graph.edges}
    assert all(d == {"bandwidth": 2.5e8, "latency": 0.001} for _, _, d in loaded.edges(data=True))
    if suffix == ".json":
        assert loaded.graph == graph.graph
        assert "edges" in json.loads(path.read_text())


def test_write_topology_is_what_the_cli_calls(tmp_path):
    out = write_topology("ring", 20, tmp_path / "sub" / "ring-20.json", seed=0, bandwidth=1e9, latency=0.0002)
    graph = load_topology(out, nodes=20)
    assert graph.graph["name"] == "ring-20" and _degrees(graph) == [2] * 20
    assert graph.edges["node-00", "node-01"] == {"bandwidth": 1e9, "latency": 0.0002}


def test_edge_list_with_integer_labels_comments_and_defaults(tmp_path):
    path = tmp_path / "tri.edges"
    path.write_text("# a triangle\n0 1 1e9 0.0002\n\n1 2   # defaults\n2 0 5e7\n")
    graph = load_topology(path, nodes=3)
    assert graph.edges["node-00", "node-01"] == {"bandwidth": 1e9, "latency": 0.0002}
    assert graph.edges["node-01", "node-02"] == {"bandwidth": 100e6, "latency": 0.0005}
    assert graph.edges["node-02", "node-00"] == {"bandwidth": 5e7, "latency": 0.0005}
    assert graph.graph["name"] == "tri"


def test_node_link_json_with_integer_labels_and_missing_attributes(tmp_path):
    path = tmp_path / "path.json"
    data = nx.node_link_data(nx.path_graph(3), edges="edges")
    data["edges"][0]["bandwidth"] = 1e6
    path.write_text(json.dumps(data))
    graph = load_topology(path, nodes=3)
    assert graph.edges["node-00", "node-01"] == {"bandwidth": 1e6, "latency": 0.0005}
    assert graph.edges["node-01", "node-02"] == {"bandwidth": 100e6, "latency": 0.0005}


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 1\n1 2 fast\n", r"bad\.edges:2: bandwidth must be a number, got 'fast'"),
        ("0 1\n1\n", r"bad\.edges:2: expected 'u v \[bandwidth_bps\] \[latency_s\]'"),
        ("0 1 1e6 0 extra\n", r"bad\.edges:1: expected"),
        ("0 1\n1 1\n", r"bad\.edges:2: self loop on 1"),
        ("0 1\n1 0\n", r"bad\.edges:2: duplicate edge 1-0 \(first on line 1\)"),
        ("0 1 0\n", r"bad\.edges:1: bandwidth must be > 0"),
        ("0 1 1e6 -0.1\n", r"bad\.edges:1: latency must be >= 0"),
        ("0 1 nan\n", r"bad\.edges:1: bandwidth must be a finite number"),
        ("0 1\n2 3\n", r"not connected \(2 components"),
        ("0 1\n1 3\n", r"integer node labels must be exactly 0\.\.2"),
        ("# nothing\n", r"has no nodes"),
    ],
)
def test_bad_edge_lists_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.edges"
    path.write_text(text)
    with pytest.raises(TopologyError, match=message):
        load_topology(path)


def test_bad_files_are_refused_with_clear_messages(tmp_path):
    with pytest.raises(TopologyError, match="no such topology file"):
        load_topology(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "nodes": [\n  oops\n}')
    with pytest.raises(TopologyError, match=r"broken\.json:3: not valid JSON"):
        load_topology(broken)
    not_node_link = tmp_path / "list.json"
    not_node_link.write_text("[1, 2]")
    with pytest.raises(TopologyError, match="not node-link JSON"):
        load_topology(not_node_link)
    directed = tmp_path / "directed.json"
    directed.write_text(json.dumps(nx.node_link_data(nx.DiGraph([(0, 1)]), edges="edges")))
    with pytest.raises(TopologyError, match="undirected simple graph"):
        load_topology(directed)
    bad_attr = tmp_path / "attr.json"
    data = nx.node_link_data(nx.path_graph(2), edges="edges")
    data["edges"][0]["latency"] = "slow"
    bad_attr.write_text(json.dumps(data))
    with pytest.raises(TopologyError, match="attr.json: edge 0-1: latency must be a finite number"):
        load_topology(bad_attr)
    other = tmp_path / "graph.gml"
    other.write_text("graph []")
    with pytest.raises(TopologyError, match="unknown topology format"):
        load_topology(other)


def test_node_count_must_match_the_swarm(tmp_path):
    path = save_topology(make_topology("ring", 10), tmp_path / "ring.json")
    with pytest.raises(TopologyError, match=r"missing \['node-10', 'node-11'\]"):
        load_topology(path, nodes=12)
    with pytest.raises(TopologyError, match="nodes do not match a 8-node swarm"):
        load_topology(path, nodes=8)
    named = tmp_path / "named.edges"
    named.write_text("alice bob\nbob carol\n")
    assert sorted(load_topology(named)) == ["alice", "bob", "carol"]
    with pytest.raises(TopologyError, match="unexpected \\['alice', 'bob', 'carol'\\]"):
        load_topology(named, nodes=3)


@pytest.mark.parametrize("name, nodes", sorted(COMMITTED.items()))
def test_committed_topology_files_load(name, nodes):
    graph = load_topology(TOPOLOGY_DIR / name, nodes=nodes)
    assert graph.graph["name"] == name.removesuffix(".json")
    assert all(d == {"bandwidth": 100e6, "latency": 0.0005} for _, _, d in graph.edges(data=True))
    kind = graph.graph["kind"]
    assert sorted(graph.edges) == sorted(make_topology(kind, nodes, seed=graph.graph["seed"]).edges)


def test_every_topology_file_is_described_in_the_readme():
    readme = (TOPOLOGY_DIR / "README.md").read_text()
    files = {p.name for p in TOPOLOGY_DIR.glob("*.json")}
    assert set(COMMITTED) <= files
    assert [name for name in sorted(files) if f"`{name}`" not in readme] == []
