import random
import time

import networkx as nx
import pytest

from p2pmoe.ledger import LedgerEntry
from p2pmoe.sim.links import comm_time_by_round, round_comm_time
from p2pmoe.topology import make_topology

MB = 1_000_000


def _msg(src, dst, size, phase=0, round_index=0, header=0):
    return LedgerEntry(round_index, src, dst, "x", header, size - header, phase)


def _graph(*links):
    """A graph from (u, v, bandwidth_bps, latency_s) tuples."""
    graph = nx.Graph()
    for u, v, bandwidth, latency in links:
        graph.add_edge(u, v, bandwidth=bandwidth, latency=latency)
    return graph


def test_two_messages_share_one_link_fairly():
    link = _graph(("a", "b", 8e6, 0.0))
    # 1 MB and 3 MB at 8 Mbit/s: both go at 4 Mbit/s until the small one is done at 2 s,
    # then the big one has the link to itself and ends at 4 s.
    assert round_comm_time([_msg("a", "b", 1 * MB, header=100)], link) == pytest.approx(1.0)
    assert round_comm_time([_msg("a", "b", 1 * MB), _msg("a", "b", 3 * MB, header=64)], link) == pytest.approx(4.0)
    small_only = [_msg("a", "b", 1 * MB), _msg("a", "b", 1 * MB)]
    assert round_comm_time(small_only, link) == pytest.approx(2.0)


def test_latency_is_added_once_per_hop():
    link = _graph(("a", "b", 8e6, 0.25))
    assert round_comm_time([_msg("a", "b", 0)], link) == pytest.approx(0.25)
    assert round_comm_time([_msg("a", "b", 1 * MB), _msg("a", "b", 3 * MB)], link) == pytest.approx(4.25)


def test_two_hop_path_takes_its_slowest_link_plus_both_latencies():
    line = _graph(("a", "b", 8e6, 0.01), ("b", "c", 4e6, 0.02))
    assert round_comm_time([_msg("a", "c", 1 * MB)], line) == pytest.approx(2.0 + 0.03)
    # b -> c competes on the slow link only: both 1 MB messages finish there at 4 s.
    both = [_msg("a", "c", 1 * MB), _msg("b", "c", 1 * MB)]
    assert round_comm_time(both, line) == pytest.approx(4.0 + 0.03)


def test_full_duplex_directions_do_not_share():
    link = _graph(("a", "b", 8e6, 0.0))
    assert round_comm_time([_msg("a", "b", 1 * MB), _msg("b", "a", 1 * MB)], link) == pytest.approx(1.0)


def test_sequential_phases_add_up():
    link = _graph(("a", "b", 8e6, 0.1))
    request_reply = [_msg("a", "b", 1 * MB, phase=0), _msg("b", "a", 3 * MB, phase=1)]
    assert round_comm_time(request_reply, link) == pytest.approx((1.0 + 0.1) + (3.0 + 0.1))
    same_phase = [_msg("a", "b", 1 * MB, phase=0), _msg("b", "a", 3 * MB, phase=0)]
    assert round_comm_time(same_phase, link) == pytest.approx(3.0 + 0.1)


def test_server_is_a_star_of_dedicated_links():
    ring = make_topology("ring", 4, bandwidth=1e3, latency=5.0)  # ring links never used below
    clients = list(ring)
    upload = [_msg(c, "server", 1 * MB, phase=0) for c in clients]
    download = [_msg("server", c, 2 * MB, phase=1) for c in clients]
    # Each client has its own 8 Mbit/s link: uploads do not share, so 1 s + 1 ms, then 2 s + 1 ms.
    assert round_comm_time(upload + download, ring, server_link=(8e6, 0.001)) == pytest.approx(3.002)
    # Two messages to one client share that client's link; the default link is 100 Mbit/s, 0.5 ms.
    twice = [_msg("server", "node-00", 1 * MB), _msg("server", "node-00", 1 * MB)]
    assert round_comm_time(twice, ring) == pytest.approx(2 * MB * 8 / 100e6 + 0.0005)
    # A server upload and a server download on the same client's link are different directions.
    duplex = [_msg("node-00", "server", 1 * MB), _msg("server", "node-00", 1 * MB)]
    assert round_comm_time(duplex, ring, server_link=(8e6, 0.0)) == pytest.approx(1.0)


def test_equal_length_routes_are_broken_towards_the_smaller_neighbour():
    square = _graph(("a", "b", 8e6, 0.0), ("b", "c", 8e6, 0.0), ("a", "d", 8e3, 0.0), ("d", "c", 8e3, 0.0))
    # a -> c has two 2-hop routes; breadth-first search from a visits b before d.
    assert round_comm_time([_msg("a", "c", 1 * MB)], square) == pytest.approx(1.0)
    assert round_comm_time([_msg("c", "a", 1 * MB)], square) == pytest.approx(1.0)


def test_multi_hop_routes_on_a_ring():
    ring = make_topology("ring", 10, bandwidth=8e6, latency=0.001)
    # node-00 -> node-05 is 5 hops either way; going through node-01 shares no link with
    # node-09 -> node-08, while node-02 -> node-03 lies on the chosen route.
    assert round_comm_time([_msg("node-00", "node-05", 1 * MB)], ring) == pytest.approx(1.005)
    crossing = [_msg("node-00", "node-05", 1 * MB), _msg("node-02", "node-03", 1 * MB)]
    assert round_comm_time(crossing, ring) == pytest.approx(2.005)


def test_rounds_are_timed_separately():
    link = _graph(("a", "b", 8e6, 0.0))
    entries = [_msg("a", "b", 1 * MB, round_index=0), _msg("a", "b", 3 * MB, round_index=1), _msg("b", "a", 1 * MB, round_index=1)]
    assert comm_time_by_round(entries, link) == pytest.approx({0: 1.0, 1: 3.0})
    with pytest.raises(ValueError, match="span rounds \\[0, 1\\]"):
        round_comm_time(entries, link)
    assert round_comm_time([], link) == 0.0


def test_unroutable_messages_and_bad_server_links_are_refused():
    link = _graph(("a", "b", 8e6, 0.0))
    with pytest.raises(ValueError, match="neither is a node of the topology"):
        round_comm_time([_msg("server", "other", 1)], link)
    with pytest.raises(ValueError, match="server_link must be"):
        round_comm_time([_msg("a", "server", 1)], link, server_link=(0.0, 0.0))


def test_hundred_nodes_ten_thousand_messages_is_fast():
    ring = make_topology("ring", 100)  # the longest routes: up to 50 hops
    ids = list(ring)
    rng = random.Random(0)
    entries = [_msg(rng.choice(ids), rng.choice(ids + ["server"]), rng.randint(1_000, 1 * MB), phase=rng.randint(0, 2)) for _ in range(10_000)]
    start = time.perf_counter()
    first = round_comm_time(entries, ring)
    assert time.perf_counter() - start < 1.0
    assert round_comm_time(entries, ring) == first > 0
