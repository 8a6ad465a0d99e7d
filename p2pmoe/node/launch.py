"""Running one daemon to the end, and starting the nodes of a swarm on this machine.

`run_daemon` is what `p2pmoe node` and `p2pmoe coordinator` do once their config is read, and
what a swarm node does. `start_node` starts a swarm node: by default it forks this process,
which has already imported torch and p2pmoe, so the pages those imports dirtied (about 146 MiB
of relocated library data and interpreter state per process: `import torch` alone) stay
shared copy-on-write between all the nodes instead of being made again by each (issue 29: a
hundred daemons on one machine). A node started under a command prefix (`ip netns exec`), or
with P2PMOE_SPAWN=1 in the environment, is a fresh `python -m p2pmoe.cli` process instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from p2pmoe.naming import SERVER_ID
from p2pmoe.node.config import NodeConfig, load_node_config
from p2pmoe.node.daemon import NodeDaemon

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def check_role(cfg: NodeConfig, role: str, path: Path | str) -> None:
    """A coordinator config must be the server of a server-mediated method; a node config
    must not be the server, so a swapped file fails at start, not rounds later."""
    if role == "coordinator" and (cfg.node_id != SERVER_ID or not cfg.experiment.has_server):
        raise ValueError(
            f"{path}: not a coordinator config: node_id must be {SERVER_ID!r} (got {cfg.node_id!r}) and "
            f"[run] method a server-mediated one (got {cfg.experiment.run.method!r} on {cfg.experiment.run.data!r}); "
            f"start clients with `p2pmoe node`"
        )
    if role == "node" and cfg.node_id == SERVER_ID:
        raise ValueError(f"{path}: node_id {SERVER_ID!r} is the coordinator; start it with `p2pmoe coordinator`")


def run_daemon(cfg: NodeConfig, source: Path | str) -> int:
    """Run `cfg`'s daemon to the end: 0 when it did what was asked, 1 naming each failure."""
    import torch
    import zmq

    if cfg.experiment.run.threads:
        torch.set_num_threads(cfg.experiment.run.threads)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    daemon = NodeDaemon(cfg)
    try:
        asyncio.run(daemon.run())
    except zmq.ZMQError as exc:  # a port in use, an address that is not ours: one line, not a traceback
        raise ValueError(f"{source}: node {cfg.node_id!r} cannot listen on {cfg.bind}: {exc}") from None
    for failure in daemon.failures:
        print(f"p2pmoe: node {cfg.node_id!r}: {failure}", file=sys.stderr)
    return 1 if daemon.failures else 0


class ForkedNode:
    """A forked swarm node, with the part of `subprocess.Popen`'s interface a swarm uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        import time

        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _child(config: Path, log_path: Path, role: str, threads: str) -> int:
    """In the forked node: its own log as stdout and stderr, fresh logging, then the daemon."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own streams until _exit
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.root.handlers.clear()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
    try:
        cfg = load_node_config(config)
        check_role(cfg, role, config)
        return run_daemon(cfg, config)
    except (ValueError, OSError) as exc:
        print(f"p2pmoe: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:  # a bug must end this node with a trace in its log, never return into the parent's code
        logging.exception("node %s failed", config)
        return 1


def _fork_unsafe() -> bool:
    """CUDA cannot be used in a child forked after it was initialised: spawn instead."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def start_node(config: Path, log_path: Path, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes] | ForkedNode:
    """Start the swarm node of `config` (a node file written by `write_node_configs`) with its
    thread budget, logging to `log_path`: forked from this process, or under `prefix` (e.g.
    `ip netns exec NS`) as a new process."""
    raw = tomllib.loads(config.read_text())  # this file was written by write_node_configs: no need to resolve it here
    threads = str(raw.get("run", {}).get("threads") or 1)
    role = "coordinator" if raw.get("node_id") == SERVER_ID else "node"
    if prefix or os.environ.get("P2PMOE_SPAWN") == "1" or _fork_unsafe():
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        command = [*prefix, sys.executable, "-m", "p2pmoe.cli", role, "--config", str(config)]
        with open(log_path, "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child(config, log_path, role, threads)
        finally:
            os._exit(code)  # never run the parent's atexit handlers or return into its stack
    return ForkedNode(pid)
