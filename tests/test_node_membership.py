import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmoe.node.membership import Membership


def test_states_follow_silence():
    m = Membership(["a", "b"], suspect_after=2.0, dead_after=5.0, start=100.0)
    m.seen("a", 101.0)
    assert m.state("a", 102.9) == "alive" and m.state("a", 103.0) == "suspect"
    assert m.state("a", 105.9) == "suspect" and m.state("a", 106.0) == "dead"
    assert m.state("b", 101.0) == "alive" and m.state("b", 105.0) == "dead"  # never heard: counts from start
    assert m.alive(102.5) == ["a"]
    with pytest.raises(KeyError):
        m.state("stranger", 0.0)


def test_start_defaults_to_the_first_time_given():
    m = Membership(["a"], 1.0, 3.0)
    assert m.state("a", 1000.0) == "alive"
    assert m.state("a", 1003.0) == "dead"


def test_each_death_and_each_revival_is_reported_once():
    m = Membership(["a", "b", "c"], 1.0, 3.0, start=0.0)
    m.seen("a", 2.5)
    assert m.newly_dead(3.0) == ["b", "c"]
    assert m.newly_dead(4.0) == []
    assert m.newly_dead(6.0) == ["a"]
    assert m.revived(6.0) == []
    m.seen("b", 7.0)
    assert m.revived(7.5) == ["b"] and m.revived(7.5) == []
    assert m.newly_dead(10.0) == ["b"]  # died again: reported again


def test_dead_then_seen_then_dead_again_before_anyone_asked_reports_nothing_new():
    m = Membership(["a"], 1.0, 2.0, start=0.0)
    assert m.newly_dead(2.0) == ["a"]
    m.seen("a", 3.0)
    assert m.newly_dead(6.0) == [] and m.revived(6.0) == []


def test_seen_adds_strangers_remove_forgets_and_table_reports():
    m = Membership([], 1.0, 2.0, start=0.0)
    m.seen("x", 5.0)
    m.seen("x", 4.0)  # out-of-order news does not move time back
    m.add("y")
    assert m.table(5.5) == {
        "x": {"state": "alive", "last_seen": 5.0, "silence": 0.5},
        "y": {"state": "dead", "last_seen": None, "silence": 5.5},
    }
    m.remove("y")
    assert m.newly_dead(100.0) == ["x"] and list(m.table(100.0)) == ["x"]


def test_thresholds_are_checked():
    with pytest.raises(ValueError):
        Membership([], 3.0, 1.0)
    with pytest.raises(ValueError):
        Membership([], 0.0, 1.0)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 8), st.booleans()), max_size=40))
def test_reports_alternate_and_match_the_state(steps):
    """For any history, a peer's reports alternate dead/revived and agree with its state."""
    m = Membership("abc", 1.0, 5.0, start=0.0)
    believed_dead: set[str] = set()
    now = 0.0
    for peer, gap, heard in steps:
        now += gap
        if heard:
            m.seen(peer, now)
        for p in m.newly_dead(now):
            assert p not in believed_dead and m.state(p, now) == "dead"
            believed_dead.add(p)
        for p in m.revived(now):
            assert p in believed_dead and m.state(p, now) != "dead"
            believed_dead.discard(p)
        assert believed_dead == {p for p in "abc" if m.state(p, now) == "dead"}
