import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from p2pmoe.node.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_keeps_tensors_round_and_extra(tmp_path):
    path = tmp_path / "node.ckpt"
    state = {"w": torch.randn(3, 4), "rng": torch.Generator().get_state()}
    save_checkpoint(path, 7, state, {"members": ["a", "b"]})
    ckpt = load_checkpoint(path)
    assert ckpt.round == 7 and ckpt.extra == {"members": ["a", "b"]}
    assert set(ckpt.state) == {"w", "rng"} and torch.equal(ckpt.state["w"], state["w"])


def test_missing_is_none_and_garbage_is_a_clear_error(tmp_path):
    assert load_checkpoint(tmp_path / "none.ckpt") is None
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        load_checkpoint(bad)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)


WRITER = """
import sys, torch
from p2pmoe.node.checkpoint import save_checkpoint
r = 0
while True:
    save_checkpoint(sys.argv[1], r, {"w": torch.full((256, 1024), float(r))})
    r += 1
"""


@pytest.mark.slow
def test_kill_9_during_writes_leaves_a_valid_checkpoint(tmp_path):
    path = tmp_path / "node.ckpt"
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        ckpt = load_checkpoint(path)
        assert torch.equal(ckpt.state["w"], torch.full((256, 1024), float(ckpt.round)))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "node.ckpt"]
    assert all(name.endswith(".tmp") for name in leftovers)
