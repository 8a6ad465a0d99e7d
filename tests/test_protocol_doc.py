"""docs/PROTOCOL.md must stay true: its example script really talks to a live node, its numpy
helpers agree with the codec both ways, and it names every kind and limit the code has."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.node.config import NodeConfig
from p2pmoe.node.daemon import NodeDaemon
from p2pmoe.node.transport import Transport
from p2pmoe.wire.codec import DTYPES, Limits, decode, encode, wire_messages
from p2pmoe.wire.messages import Message, MessageKind

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
NODE_ID = "node-00"


def _block(tag: str) -> str:
    """The first ```python block of the doc whose first line is the comment `# <tag>`."""
    for code in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        if code.startswith(f"# {tag}"):
            return code
    raise AssertionError(f"docs/PROTOCOL.md has no python block tagged '# {tag}'")


async def _run_example_against_a_node(script: Path, tmp_path: Path) -> str:
    """Serve a node's receive loop on loopback and run the example as its own process."""
    cfg = NodeConfig(NODE_ID, "tcp://127.0.0.1:0", tmp_path / "node", {}, resolve_experiment(default_config(method="fedavg")))
    daemon = NodeDaemon(cfg, method=FedAvgServer(NODE_ID, clients=[], template={}))
    daemon.transport = Transport(NODE_ID, "tcp://127.0.0.1:*")
    serving = asyncio.create_task(daemon._receive_loop())
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            env={**os.environ, "P2PMOE_ENDPOINT": daemon.transport.address},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), 20)
        except TimeoutError:
            process.kill()
            raise
        assert process.returncode == 0, err.decode()
        return out.decode()
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await daemon.transport.close()


@pytest.mark.timeout(30)
def test_example_script_gets_hello_and_error_replies_from_a_live_node(tmp_path: Path) -> None:
    code = _block("protocol-example")
    assert not re.search(r"^\s*(import|from)\s+(p2pmoe|torch)\b", code, flags=re.M)
    script = tmp_path / "example.py"
    script.write_text(code)
    out = asyncio.run(_run_example_against_a_node(script, tmp_path))
    assert out.splitlines() == [
        f"hello {NODE_ID} 0 {{'round': -1, 'done': False, 'reply': True}}",
        "config hash matches",  # the document's hash rule, computed without p2pmoe
        f"error {NODE_ID} unsupported protocol version 3 (speak 2)",
    ]
    printed = re.search(r"it prints:\n\n```\n(.*?)```", DOC.read_text(), flags=re.S)
    assert printed is not None and printed.group(1) == out


def _helpers() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(_block("protocol-tensors"), "PROTOCOL.md", "exec"), namespace)
    return namespace


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(5 * 2**20 // 4, generator=generator),  # 5 MiB: twenty-one 256 KiB chunks with the rest
        "matrix": torch.randn(3, 4, generator=generator).to(torch.float64),
        "half": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 5, generator=generator).to(torch.bfloat16),
        "ids": torch.arange(-3, 3, dtype=torch.int64),
        "counts": torch.arange(4, dtype=torch.int32),
        "small": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bytes": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _wire_dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def test_numpy_helpers_read_what_the_codec_writes() -> None:
    tensors = _tensors()
    frames = encode("a", Message(MessageKind.MODEL_UPDATE, 3, tensors, {"num_examples": 1}), xfer=b"ABCD")
    header, arrays = _helpers()["unpack_message"]([[bytes(f) for f in m] for m in wire_messages(frames)])
    assert header["xfer"] == b"ABCD" and header["meta"] == {"num_examples": 1}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:  # the doc's recipe: words << 16 viewed as float32
            got = torch.from_numpy((arrays[name].astype(np.uint32) << 16).view(np.float32))
            assert torch.equal(got, tensor.float())
        else:
            assert torch.equal(torch.from_numpy(arrays[name].copy()), tensor), name


@pytest.mark.parametrize("which", ["all", "small"])
def test_codec_accepts_what_the_numpy_helpers_write(which: str) -> None:
    tensors = {k: v for k, v in _tensors().items() if which == "all" or k != "big"}  # a transfer, and one ZeroMQ message
    arrays = {}
    for name, tensor in tensors.items():
        source = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        arrays[name] = (_wire_dtype(tensor), source.numpy())
    head = {"v": 2, "kind": "model_update", "src": "a", "round": 3, "meta": {"num_examples": 1}}
    messages = _helpers()["pack_message"](head, arrays, b"WXYZ")
    ours = wire_messages(encode("a", Message(MessageKind.MODEL_UPDATE, 3, tensors, {"num_examples": 1}), xfer=b"WXYZ"))
    assert [[bytes(f) for f in m] for m in messages] == [[bytes(f) for f in m] for m in ours]  # byte for byte
    assert (len(messages) > 1) == (which == "all")
    envelope = decode([frame for message in messages for frame in message])
    for name, tensor in tensors.items():
        assert torch.equal(envelope.message.tensors[name], tensor), name


def test_doc_names_every_kind_limit_and_dtype() -> None:
    text = DOC.read_text()
    for kind in MessageKind:
        assert f"### `{kind.value}`" in text or f"| `{kind.value}` |" in text, kind
    for field in dataclasses.fields(Limits):
        assert f"| `{field.name}` |" in text, field.name
    assert set(_helpers()["NUMPY"]) == set(DTYPES)
    for dtype in DTYPES:
        assert f"| `{dtype}` |" in text, dtype
