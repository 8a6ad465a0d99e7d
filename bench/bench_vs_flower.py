"""p2pmoe against Flower (flwr 1.42.0) on the same federated work, on this machine.

    make bench-deps                                   # installs flwr[simulation]==1.42.0 (the `bench` extra)
    python bench/bench_vs_flower.py --quick           # both systems, 2 clients, 1 round, 200 examples
    python bench/bench_vs_flower.py --repeats 3       # the comparison

The work: FedAvg, Fashion-MNIST, 10 clients, Dirichlet 0.5 label split, 5 rounds, 1 local
epoch, at most 2,000 training examples per client, p2pmoe's fmnist MoE classifier with its SGD
optimiser, every client evaluated after every round. Flower runs the Flower App in
bench/flower_app/, whose ClientApp builds each client's learner with p2pmoe's own
`ImageTask.learners` (same split, model, initial weights, optimiser, batch order and
evaluation) and whose ServerApp runs Flower's FedAvg strategy; the final accuracies of the four
systems agree when the work is the same.

Each repeat runs, one after the other so that load on a shared machine hits all alike:
  1. p2pmoe-simulate     `p2pmoe simulate` (every node in one process, in-memory network, one
                         node at a time on all cores: the default)
     p2pmoe-simulate-workers  the same with `--workers` = cores: that many nodes at a time, one
                         torch thread each (the numbers of `--threads 1`, as the swarm's)
  2. flower-simulation   `flower-superlink --simulation` + `flwr run` with num-supernodes=N and
                         Flower's default client resources (num_cpus=2, num_gpus=0 per ClientApp)
  3. p2pmoe-swarm        `p2pmoe swarm` (one daemon per client plus the FedAvg coordinator, ZeroMQ on loopback)
  4. flower-deployment   `flower-superlink` + N `flower-supernode` (insecure, loopback, ClientApps
                         in subprocess isolation, Flower's default) + `flwr run`
p2pmoe runs with `--no-report` (Flower draws no figures either). Flower's SuperLink runs with
`--disable-runtime-dependency-installation`: everything is installed already, and the default
would `uv sync` a fresh environment for the app at every run.

Measured per run: wall time from the first process started to the run's end (the last
command exiting: `p2pmoe ...` or `flwr run --stream`), including start-up and data loading;
memory by polling /proc/<pid>/status of every process of the run (the process trees of the
commands started, followed through /proc/<pid>/stat parents every POLL_SECONDS): peak total
RSS (the largest sum of VmRSS over the run's live processes at one poll; shared library pages
count once per process) and the largest VmHWM (peak RSS) of any one process; final accuracy
(mean over clients, own test split) and global accuracy (mean over clients, 2,000 fixed test
images). A run past `--timeout` is stopped and recorded as a timeout, not as a time.

Targets (issue 15), ratios from the same run: p2pmoe-simulate wall <= 0.5 x flower-simulation
wall (checked for both p2pmoe-simulate systems); p2pmoe-swarm wall <= flower-deployment wall; every p2pmoe-swarm process's peak RSS < 400 MB.

Prints a table and saves bench/results/<name>.json and <name>.md (name: vs_flower, or
vs_flower_quick with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from p2pmoe.harness import add_flags, bench_parser, chosen, parse_flags, rerun_command, write_results
from p2pmoe.node.swarm import free_ports
from p2pmoe.report import format_table

FLOWER_APP = Path(__file__).parent / "flower_app"
SYSTEMS = ("p2pmoe-simulate", "p2pmoe-simulate-workers", "flower-simulation", "p2pmoe-swarm", "flower-deployment")
POLL_SECONDS = 0.5  # /proc sampling period: cheap next to training, fine enough for steady peaks
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when a run's processes are stopped
READY_TIMEOUT = 60.0  # seconds a SuperLink may take to open its port
SWARM_RSS_LIMIT_MB = 400


@dataclass(frozen=True)
class Setting:
    """The federated work both systems do."""

    nodes: int = 10
    rounds: int = 5
    max_train: int = 2000
    partition: str = "dirichlet:0.5"
    local_epochs: int = 1
    seed: int = 0

    def describe(self) -> str:
        return (
            f"FedAvg, Fashion-MNIST, {self.nodes} clients, {self.partition} label split, {self.rounds} rounds, "
            f"{self.local_epochs} local epoch, <= {self.max_train:,} training examples per client, seed {self.seed}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="times each system runs, in turns")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take before it is stopped and recorded as a timeout")
    add_flags(parser, "only")
    parser.add_argument("--quick", action="store_true", help="check both systems run: 2 clients, 1 round, 200 examples, 1 repeat")
    parser.add_argument("--nodes", type=int, help="clients (default 10; a smaller work than the issue's is named so in the results)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5)")
    parser.add_argument("--max-train", type=int, help="training examples per client at most (default 2000)")
    add_flags(parser, "name", "results")
    args = parse_flags(parser, argv)
    if args.repeats < 1 or args.timeout <= 0:
        parser.error("--repeats must be >= 1 and --timeout > 0")
    args.systems = chosen(parser, args, SYSTEMS)
    base = Setting(nodes=2, rounds=1, max_train=200) if args.quick else Setting()
    given = {"nodes": args.nodes, "rounds": args.rounds, "max_train": args.max_train}
    args.setting = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    if args.quick:
        args.repeats = 1
    args.name = args.name or ("vs_flower_quick" if args.quick else "vs_flower")
    args.command = rerun_command(parser, args, skip=("results", "systems", "setting"))
    return args


# -- memory of a process tree ------------------------------------------------------------------


TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, start time, user + system CPU time) of a live process, times in clock
    ticks; the start time tells a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """The given `kB` fields of /proc/<pid>/status (VmRSS, VmHWM); empty once the process is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _command(pid: int) -> str:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return _without_paths(" ".join(p.decode(errors="replace") for p in parts if p))[:120]


_PATH = re.compile(r"(?:/[^\s/=,:]+)+/([^\s/=,:]+)")


def _without_paths(command: str) -> str:
    """`command` with every absolute path cut to its last part: the results name programs, not
    where this machine keeps them."""
    return _PATH.sub(r"\1", command)


@dataclass
class TreeMemory:
    """Peak memory of every process descended from some root pids, by polling /proc.

    Why polling VmHWM and not getrusage(RUSAGE_CHILDREN): that reports the largest single
    descendant that was waited for, not a sum, and misses processes that are reparented
    (Ray's and Flower's helpers) or never reaped by us. A process is followed from the first
    poll that finds it under a root until it exits; its VmHWM is the kernel's own peak, so a
    short peak between polls is still caught per process. The total is the largest sum of
    VmRSS seen at one poll, so it can miss a peak shorter than POLL_SECONDS.

    CPU time (user + system, summed over the processes) is kept too: on a shared machine wall
    time says as much about the neighbours as about the system, CPU time less so (torch's
    OpenMP threads still spin longer when starved). A process loses at most its last
    POLL_SECONDS of CPU time, when it exits between polls.
    """

    roots: list[int] = field(default_factory=list)
    interval: float = POLL_SECONDS
    hwm_kb: dict[tuple[int, int], int] = field(default_factory=dict)
    commands: dict[tuple[int, int], str] = field(default_factory=dict)
    cpu_ticks: dict[tuple[int, int], int] = field(default_factory=dict)
    peak_total_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def live(self) -> list[int]:
        """Pids of the roots, their descendants and processes followed before, still alive."""
        parents: dict[int, int] = {}
        started: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                parents[int(entry.name)], started[int(entry.name)], _ = stat
        keep = {pid for pid in self.roots if pid in parents}
        keep |= {pid for pid, start in self.hwm_kb if started.get(pid) == start}
        grew = True
        while grew:
            children = {pid for pid, parent in parents.items() if parent in keep} - keep
            keep |= children
            grew = bool(children)
        return sorted(keep & started.keys())

    def poll(self) -> None:
        total = 0
        for pid in self.live():
            stat = _stat(pid)
            fields = _status_kb(pid, ("VmRSS", "VmHWM"))
            if stat is None or not fields:
                continue
            key = (pid, stat[1])
            if key not in self.commands:
                self.commands[key] = _command(pid)
            self.hwm_kb[key] = max(self.hwm_kb.get(key, 0), fields.get("VmHWM", 0))
            self.cpu_ticks[key] = stat[2]
            total += fields.get("VmRSS", 0)
        self.peak_total_kb = max(self.peak_total_kb, total)

    def kill_all(self) -> None:
        """SIGTERM every live process of the tree, SIGKILL what is left after STOP_GRACE."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.live()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + STOP_GRACE
            while self.live() and time.monotonic() < deadline and sig == signal.SIGTERM:
                time.sleep(0.2)

    def summary(self) -> dict[str, Any]:
        """Figures in MiB (/proc's "kB" are KiB); the largest processes with their commands."""
        per_process = sorted(((hwm / 1024, self.commands.get(key, "?")) for key, hwm in self.hwm_kb.items()), reverse=True)
        return {
            "peak_total_rss_mib": round(self.peak_total_kb / 1024, 1),
            "max_process_rss_mib": round(per_process[0][0], 1) if per_process else None,
            "processes": len(per_process),
            "cpu_seconds": round(sum(self.cpu_ticks.values()) / TICKS, 1),
            "largest_processes": [{"rss_mib": round(mib, 1), "command": cmd} for mib, cmd in per_process[:15]],
        }


# -- one run of one system ---------------------------------------------------------------------


def _bin(name: str) -> str:
    """A console script of the interpreter running this bench (its venv need not be on PATH)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage pings from an offline machine
    return env


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open after {timeout:.0f} s")


def _p2pmoe_command(system: str, setting: Setting, out: Path) -> list[str]:
    """The command line of a p2pmoe system: `simulate` (optionally with workers) or `swarm`."""
    kind = "swarm" if system == "p2pmoe-swarm" else "simulate"
    workers = ["--workers", str(os.cpu_count() or 1), "--device", "cpu"] if system == "p2pmoe-simulate-workers" else []
    return [
        sys.executable,
        "-m",
        "p2pmoe.cli",
        kind,
        "--method",
        "fedavg",
        "--data",
        "fmnist",
        "--nodes",
        str(setting.nodes),
        "--partition",
        setting.partition,
        "--rounds",
        str(setting.rounds),
        "--local-epochs",
        str(setting.local_epochs),
        "--max-train-per-node",
        str(setting.max_train),
        "--seed",
        str(setting.seed),
        "--out",
        str(out),
        "--no-report",
        *(["--quiet"] if kind == "simulate" else []),
        *workers,
    ]


def _run_config(setting: Setting, result: Path) -> str:
    return (
        f'num-server-rounds={setting.rounds} nodes={setting.nodes} partition="{setting.partition}" '
        f'max-train-per-node={setting.max_train} local-epochs={setting.local_epochs} seed={setting.seed} result-path="{result}"'
    )


def _flwr_home(folder: Path, port: int) -> dict[str, str]:
    """A Flower configuration of its own (FLWR_HOME) naming one insecure loopback SuperLink,
    so the bench neither reads nor writes ~/.flwr."""
    home = folder / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return {"FLWR_HOME": str(home)}


Starter = Callable[..., "subprocess.Popen[bytes]"]


def _start_flower(system: str, setting: Setting, folder: Path, start: Starter, ready: float, result_path: Path) -> subprocess.Popen[bytes]:
    """A SuperLink (simulation mode for flower-simulation), the SuperNodes of a deployment,
    then `flwr run` of the app, each through `start`; returns the `flwr run` process."""
    (port,) = free_ports(1)
    env = _flwr_home(folder, port)
    superlink = [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    if system == "flower-simulation":
        superlink.append("--simulation")
    _wait_port(port, start(superlink, "superlink.log", env), ready)
    run = [_bin("flwr"), "run", str(FLOWER_APP), "bench", "--stream", "--run-config", _run_config(setting, result_path)]
    if system == "flower-simulation":
        run += ["--federation-config", f"num-supernodes={setting.nodes}"]
    else:
        for k, node_port in enumerate(free_ports(setting.nodes)):
            node = [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(node_port)]
            start([*node, "--node-config", f"partition-id={k} num-partitions={setting.nodes}"], f"supernode-{k}.log", env)
    return start(run, "flwr-run.log", env)


def run_system(system: str, setting: Setting, folder: Path, timeout: float) -> dict[str, Any]:
    """Run one system once in `folder`; return its wall time, memory, accuracy and status."""
    folder.mkdir(parents=True, exist_ok=True)
    memory = TreeMemory().start()
    logs: list[Any] = []
    procs: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        handle = open(folder / log, "wb")  # closed after the run, once its processes are gone
        logs.append(handle)
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True, cwd=folder)
        procs.append(proc)
        memory.roots.append(proc.pid)
        return proc

    load_before = os.getloadavg()
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    status, result_path, error = "ok", folder / "flower_result.json", None
    try:
        if system.startswith("p2pmoe"):
            last = start(_p2pmoe_command(system, setting, folder / "run"), "p2pmoe.log")
        else:
            last = _start_flower(system, setting, folder, start, min(READY_TIMEOUT, timeout), result_path)
        while last.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if last.poll() is None:
            status = "timeout"
        elif last.returncode != 0:
            status, error = "failed", f"exit code {last.returncode}; see {folder}"
    except (RuntimeError, TimeoutError, OSError) as err:
        status, error = "failed", str(err)
    finally:  # also when the bench itself is stopped: Flower's helpers run in sessions of their own
        wall = time.perf_counter() - started
        memory.stop()
        memory.kill_all()
        for proc in procs:
            proc.wait()
        for handle in logs:
            handle.close()
    row: dict[str, Any] = {
        "system": system,
        "status": status,
        "wall_seconds": round(wall, 1) if status == "ok" else None,
        "stopped_after_seconds": round(wall, 1) if status != "ok" else None,
        **memory.summary(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    if error:
        row["error"] = error
    row.update(_accuracy(system, folder, result_path, status))
    return row


def _accuracy(system: str, folder: Path, flower_result: Path, status: str) -> dict[str, Any]:
    """Final accuracy and global accuracy (means over clients) and the rounds they come from."""
    if status != "ok":
        return {}
    if system.startswith("p2pmoe"):
        summary = json.loads((folder / "run" / "summary.json").read_text())
        metrics = summary["metrics"]
        return {"accuracy": metrics["accuracy"], "global_accuracy": metrics["global_accuracy"], "evaluated_round": summary["selection"]["round"] + 1}
    if not flower_result.exists():
        return {"error": f"the ServerApp wrote no {flower_result.name}"}
    result = json.loads(flower_result.read_text())
    metrics, trained = result["metrics"], result["train_by_round"]
    threads = trained[max(trained, key=int)].get("torch-threads") if trained else None  # what Ray or the default gave a ClientApp
    row = {"accuracy": metrics["accuracy"], "global_accuracy": metrics["global_accuracy"], "evaluated_round": result["rounds"]}
    return {**row, "clientapp_torch_threads": threads}


# -- the comparison ----------------------------------------------------------------------------


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three targets from this run's medians; a system with a timeout or failure in
    any repeat leaves its ratio open rather than guessed."""
    by = {s: [r for r in rows if r["system"] == s] for s in SYSTEMS}

    def wall(system: str) -> float | None:
        runs = by[system]
        return _median(runs, "wall_seconds") if runs and all(r["status"] == "ok" for r in runs) else None

    def ratio(a: str, b: str) -> dict[str, Any]:
        wa, wb = wall(a), wall(b)
        timed_out = [s for s in (a, b) if any(r["status"] == "timeout" for r in by[s])]
        ca, cb = _median(by[a], "cpu_seconds"), _median(by[b], "cpu_seconds")
        cpu = round(ca / cb, 3) if ca and cb and wa and wb else None  # CPU of a finished run against a finished run only
        return {"ratio": round(wa / wb, 3) if wa and wb else None, "cpu_ratio": cpu, "timed_out": timed_out}

    sim, dep = ratio("p2pmoe-simulate", "flower-simulation"), ratio("p2pmoe-swarm", "flower-deployment")
    sim_workers = ratio("p2pmoe-simulate-workers", "flower-simulation")
    swarm_rss = [r["max_process_rss_mib"] for r in by["p2pmoe-swarm"] if r.get("max_process_rss_mib") is not None]
    # p2pmoe-swarm beats a Flower deployment that never finished: a timeout is a lower bound on its wall
    dep_met = dep["ratio"] <= 1 if dep["ratio"] is not None else (wall("p2pmoe-swarm") is not None and "flower-deployment" in dep["timed_out"])
    checks = [
        {"target": "p2pmoe-simulate wall <= 0.5 x flower-simulation wall", **sim, "met": sim["ratio"] is not None and sim["ratio"] <= 0.5},
        {
            "target": "p2pmoe-simulate-workers wall <= 0.5 x flower-simulation wall",
            **sim_workers,
            "met": sim_workers["ratio"] is not None and sim_workers["ratio"] <= 0.5,
        },
        {"target": "p2pmoe-swarm wall <= flower-deployment wall", **dep, "met": dep_met},
        {
            "target": f"every p2pmoe-swarm process peak RSS < {SWARM_RSS_LIMIT_MB} MB",
            "max_mib": max(swarm_rss) if swarm_rss else None,
            "met": bool(swarm_rss) and max(swarm_rss) * 1.048576 < SWARM_RSS_LIMIT_MB,
        },
    ]
    needs = (
        ("p2pmoe-simulate", "flower-simulation"),
        ("p2pmoe-simulate-workers", "flower-simulation"),
        ("p2pmoe-swarm", "flower-deployment"),
        ("p2pmoe-swarm",),
    )
    for check, systems in zip(checks, needs, strict=True):
        if not all(by[s] for s in systems):  # left out with --only: neither met nor missed
            check["met"] = None
    return checks


def render(args: argparse.Namespace, rows: list[dict[str, Any]], checks: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    table_rows = []
    for r in rows:
        wall = f"{r['wall_seconds']:.1f}" if r["status"] == "ok" else f"{r['status']} after {r['stopped_after_seconds']:.0f}"
        table_rows.append(
            {
                "repeat": r["repeat"],
                "system": r["system"],
                "wall_s": wall,
                "peak_total_rss_MiB": f"{r['peak_total_rss_mib']:.0f}",
                "max_process_rss_MiB": f"{r['max_process_rss_mib']:.0f}" if r["max_process_rss_mib"] is not None else "-",
                "processes": r["processes"],
                "cpu_s": f"{r['cpu_seconds']:.0f}",
                "accuracy": f"{r['accuracy']:.4f}" if "accuracy" in r else "-",
                "global_accuracy": f"{r['global_accuracy']:.4f}" if "global_accuracy" in r else "-",
                "load_1min_before/after": f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}",
            }
        )
    columns = list(table_rows[0]) if table_rows else []
    lines = []
    for check in checks:
        if "ratio" in check:
            got = f"wall ratio {check['ratio']} (CPU-time ratio {check['cpu_ratio']})" if check["ratio"] is not None else "ratio open"
            if check["timed_out"]:
                got += f" (timed out: {', '.join(check['timed_out'])} at {args.timeout:.0f} s)"
        else:
            got = f"largest {check['max_mib']} MiB" if check["max_mib"] is not None else "not measured"
        verdict = "not run" if check["met"] is None else "met" if check["met"] else "missed"
        lines.append(f"- {check['target']}: {got}; **{verdict}**")
    scope = "" if args.setting == Setting() else f"**Not the issue's work** ({Setting().describe()}): a smaller one. "
    return (
        f"# p2pmoe against Flower {machine['flwr']}\n\n"
        f"{scope}{args.setting.describe()}; p2pmoe's fmnist MoE classifier (4 experts, SGD lr 0.05, momentum 0.9, batch 64) in both; "
        f"every client evaluated after every round. Systems alternate within each repeat. Flower simulation: Flower's default "
        f"client resources (num_cpus=2, num_gpus=0 per ClientApp, so {max(1, machine['cores'] // 2)} ClientApp(s) at a time on "
        f"{machine['cores']} cores); Flower deployment: 1 SuperLink + {args.setting.nodes} SuperNodes, insecure, loopback, ClientApps "
        f"in subprocesses (Flower's default). p2pmoe: `--no-report`; simulate-workers `--workers {machine['cores']}` (one torch "
        f"thread per worker); swarm threads per daemon max(1, cores // processes).\n\n"
        f"Wall: first process started to the run's last command exiting (start-up, data loading, all rounds); a run past "
        f"--timeout is stopped and reported as such. Memory from /proc every {POLL_SECONDS} s over every process of the run: "
        f"peak total = largest sum of VmRSS at one poll, max process = largest VmHWM (MiB); cpu_s = user + system CPU seconds "
        f"summed over the run's processes (less sensitive to the machine's other load than wall, not immune: starved OpenMP threads spin).\n\n"
        f"Machine: {machine['cores']} cores, {machine['platform']}, torch {machine['torch']}, niceness {os.nice(0)}; "
        f"load average (1, 5, 15 min) at start "
        f"{machine['load_start']}, at end {machine['load_end']}; {machine['date']}.\n\n"
        f"Command: `{args.command}`\n\n```\n{format_table(table_rows, columns)}\n```\n\n"
        f"Targets (issue 15), from the medians of this run:\n\n" + "\n".join(lines) + "\n"
    )


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through run_system's clean-up


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    if shutil.which("flwr", path=str(Path(sys.executable).parent)) is None and shutil.which("flwr") is None:
        sys.exit("flwr is not installed: `make bench-deps` (pip install -e '.[bench]')")
    import torch  # only for the machine line; the systems run in their own processes

    machine: dict[str, Any] = {
        "cores": os.cpu_count() or 1,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": version("flwr"),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_vs_flower_") as scratch:
        for repeat in range(1, args.repeats + 1):
            for system in args.systems:
                print(f"repeat {repeat}: {system} ...", flush=True)
                row = {"repeat": repeat, **run_system(system, args.setting, Path(scratch) / f"{repeat}-{system}", args.timeout)}
                rows.append(row)
                shown = {k: row.get(k) for k in ("status", "wall_seconds", "cpu_seconds", "peak_total_rss_mib", "max_process_rss_mib", "accuracy", "error")}
                print(f"  {shown}", flush=True)
                if row["status"] == "failed":
                    for log in sorted((Path(scratch) / f"{repeat}-{system}").glob("*.log")):
                        print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-1500:]}", file=sys.stderr)
    machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
    checks = targets(rows)
    text = render(args, rows, checks, machine)
    setting = {**vars(args.setting), "systems": args.systems, "repeats": args.repeats, "timeout_seconds": args.timeout}
    write_results(args.results, args.name, {"setting": setting, "machine": machine, "targets": checks, "runs": rows}, text)
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
