"""bench/bench_vs_flower.py without Flower: argument parsing, the /proc memory of a process tree
and how targets read timeouts. The runs themselves need flwr (`make bench-deps`)."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "bench_vs_flower.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_flower", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_is_the_tiny_setting_once(bench):
    args = bench.parse_args(["--quick", "--repeats", "5", "--only", "p2pmoe-simulate,flower-simulation"])
    assert (args.setting.nodes, args.setting.rounds, args.setting.max_train, args.repeats) == (2, 1, 200, 1)
    assert args.systems == ["p2pmoe-simulate", "flower-simulation"] and args.name == "vs_flower_quick"
    full = bench.parse_args([])
    assert (full.setting.nodes, full.setting.rounds, full.setting.max_train, full.repeats, full.name) == (10, 5, 2000, 3, "vs_flower")
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "flower-cloud"])


# A child that starts a grandchild holding ~60 MiB, then both wait to be stopped.
TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(60 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"])
time.sleep(60)
"""


@pytest.mark.slow
def test_tree_memory_follows_grandchildren_and_stops_them(bench):
    root = subprocess.Popen([sys.executable, "-c", TREE], start_new_session=True)
    memory = bench.TreeMemory(roots=[root.pid], interval=0.05).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(hwm > 60 * 1024 for hwm in memory.hwm_kb.values()):
            time.sleep(0.05)
        memory.stop()
        figures = memory.summary()
        assert figures["processes"] == 2
        assert 60 <= figures["max_process_rss_mib"] < 200 and figures["peak_total_rss_mib"] >= 60
        assert len(memory.live()) == 2
    finally:
        memory.kill_all()
        root.wait(timeout=20)
    assert memory.live() == []


def _row(system, status="ok", wall=None, rss=None):
    return {"system": system, "status": status, "wall_seconds": wall, "max_process_rss_mib": rss}


def test_targets_take_a_timeout_as_a_bound_not_a_number(bench):
    rows = [
        _row("p2pmoe-simulate", wall=100.0),
        _row("flower-simulation", wall=150.0),
        _row("p2pmoe-swarm", wall=300.0, rss=350.0),
        _row("flower-deployment", status="timeout"),
    ]
    sim, workers, dep, rss = bench.targets(rows)
    assert sim["ratio"] == 0.667 and not sim["met"]
    assert workers["ratio"] is None and workers["met"] is None  # not run: neither met nor missed
    assert dep["ratio"] is None and dep["timed_out"] == ["flower-deployment"] and dep["met"]
    assert rss["max_mib"] == 350.0 and rss["met"]
    rows[2] = _row("p2pmoe-swarm", status="timeout", rss=390.0)
    rows.append(_row("p2pmoe-simulate-workers", wall=70.0))
    _, workers, dep, rss = bench.targets(rows)
    assert workers["ratio"] == 0.467 and workers["met"]
    assert dep["ratio"] is None and not dep["met"] and not rss["met"]  # 390 MiB is 409 MB


def test_recorded_commands_name_programs_not_where_this_machine_keeps_them(bench):
    line = "python3.11 -u /opt/env/lib/python3.11/site-packages/ray/agent.py --logs-dir=/tmp/ray/session_1 --port=8265"
    assert bench._without_paths(line) == "python3.11 -u agent.py --logs-dir=session_1 --port=8265"
