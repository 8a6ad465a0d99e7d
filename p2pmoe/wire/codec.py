"""The one codec: a msgpack header frame followed by raw tensor frames.

Both drivers (daemon and simulator) encode with this module, so bytes counted in simulation
are the bytes on the wire. Decoding treats every byte as hostile: nothing is trusted until it
has been checked against the header, the limits and the dtype allow-list. No pickle.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
import torch

from p2pmoe.wire.compression import CompressionError, compress, decompress, scheme_for
from p2pmoe.wire.messages import Message, MessageKind

PROTOCOL_VERSION = 1

# Wire dtype name -> torch dtype. Only plain numeric types; nothing that needs code to rebuild.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_FLOAT_NAMES = {"float32", "float16", "bfloat16", "float64"}


class ProtocolError(ValueError):
    """A message broke the protocol; the text is safe to send back to its sender."""


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. Checked before any tensor is built."""

    max_message_bytes: int = 256 * 2**20
    max_tensors: int = 4096
    max_header_bytes: int = 1 * 2**20
    max_dims: int = 8
    max_frames: int = 8192
    frame_bytes: int = 2 * 2**20
    require_finite: bool = True


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Envelope:
    """A decoded message together with who says they sent it."""

    src: str
    message: Message


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    data = tensor.detach().contiguous().cpu().reshape(-1)
    if data.numel() == 0:
        return memoryview(b"")
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: ship its raw 16-bit words
        data = data.view(torch.int16)
    array = data.numpy()
    if sys.byteorder == "big":  # the wire is little-endian
        array = array.byteswap()
    return memoryview(array).cast("B")


def encode(
    src: str, message: Message, limits: Limits = DEFAULT_LIMITS, compression: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """Frames for `message`: header first, then each tensor in chunks of `frame_bytes`.

    `compression` maps message kinds (or '*') to a scheme of p2pmoe.wire.compression.
    """
    table: list[list[Any]] = []
    payload: list[memoryview] = []
    tensors, comp = compress(message.tensors, scheme_for(MessageKind(message.kind).value, compression or {}))
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ProtocolError(f"tensor {name!r}: dtype {tensor.dtype} is not sendable")
        raw = _tensor_bytes(tensor)
        chunks = [raw[i : i + limits.frame_bytes] for i in range(0, len(raw), limits.frame_bytes)]
        table.append([name, _DTYPE_NAMES[tensor.dtype], list(tensor.shape), len(raw), len(chunks)])
        payload.extend(chunks)
    header = {
        "v": PROTOCOL_VERSION,
        "kind": MessageKind(message.kind).value,
        "src": src,
        "round": int(message.round),
        "meta": message.meta,
        "tensors": table,
    }
    if comp:
        header["comp"] = comp
    return [msgpack.packb(header, use_bin_type=True), *payload]


def frame_sizes(frames: Sequence[bytes | memoryview]) -> tuple[int, int]:
    """(header bytes, payload bytes) of an encoded message."""
    return len(frames[0]), sum(len(f) for f in frames[1:])


def require(condition: bool, reason: str) -> None:
    """Raise ProtocolError(reason) unless `condition`: the one way input checks fail."""
    if not condition:
        raise ProtocolError(reason)


def _is_count(value: Any) -> bool:
    """A non-negative int that is not a bool (msgpack gives True for a packed true)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_table(header: dict[str, Any], limits: Limits) -> list[tuple[str, str, list[int], int, int]]:
    table = header.get("tensors")
    require(isinstance(table, list), "header field 'tensors' must be a list")
    require(len(table) <= limits.max_tensors, f"too many tensors: {len(table)} > {limits.max_tensors}")
    rows = []
    seen: set[str] = set()
    for i, row in enumerate(table):
        require(isinstance(row, list) and len(row) == 5, f"tensor entry {i} must be [name, dtype, shape, nbytes, nframes]")
        name, dtype, shape, nbytes, nframes = row
        require(isinstance(name, str) and name not in seen, f"tensor entry {i}: name must be a unique string")
        seen.add(name)
        require(dtype in DTYPES, f"tensor {name!r}: dtype {dtype!r} not allowed")
        require(
            isinstance(shape, list) and len(shape) <= limits.max_dims
            and all(_is_count(d) for d in shape),
            f"tensor {name!r}: bad shape {shape!r}",
        )
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        require(
            _is_count(nbytes) and nbytes == math.prod(shape) * itemsize,
            f"tensor {name!r}: declared {nbytes!r} bytes, shape {shape} of {dtype} needs {math.prod(shape) * itemsize}",
        )
        require(_is_count(nframes) and nframes <= max(1, nbytes), f"tensor {name!r}: bad frame count")
        rows.append((name, dtype, shape, nbytes, nframes))
    total = sum(r[3] for r in rows)
    require(total <= limits.max_message_bytes, f"message declares {total} bytes > limit {limits.max_message_bytes}")
    return rows


def _decode_header(frame: bytes | memoryview, limits: Limits) -> dict[str, Any]:
    require(len(frame) <= limits.max_header_bytes, f"header of {len(frame)} bytes exceeds {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from None
    require(isinstance(header, dict), "header must be a map")
    require(header.get("v") == PROTOCOL_VERSION, f"unsupported protocol version {header.get('v')!r} (speak {PROTOCOL_VERSION})")
    require(isinstance(header.get("src"), str), "header field 'src' must be a string")
    require(_is_count(header.get("round")), "header field 'round' must be a non-negative integer")
    require(isinstance(header.get("meta", {}), dict), "header field 'meta' must be a map")
    try:
        MessageKind(header.get("kind"))
    except ValueError:
        raise ProtocolError(f"unknown message kind {header.get('kind')!r}") from None
    return header


def decode(frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Validate and decode frames into an Envelope, or raise ProtocolError saying why."""
    require(len(frames) >= 1, "empty message")
    require(len(frames) <= limits.max_frames, f"too many frames: {len(frames)} > {limits.max_frames}")
    header = _decode_header(frames[0], limits)
    rows = _parse_table(header, limits)
    require(len(frames) - 1 == sum(r[4] for r in rows), f"expected {sum(r[4] for r in rows)} tensor frames, got {len(frames) - 1}")
    tensors: dict[str, torch.Tensor] = {}
    cursor = 1
    for name, dtype, shape, nbytes, nframes in rows:
        parts = [memoryview(p).cast("B") for p in frames[cursor : cursor + nframes]]
        cursor += nframes
        got = sum(len(p) for p in parts)
        require(got == nbytes, f"tensor {name!r}: header says {nbytes} bytes, frames carry {got}")
        raw = torch.empty(nbytes, dtype=torch.uint8)  # no zero fill: every byte is copied below
        view = raw.numpy()
        offset = 0
        for part in parts:
            view[offset : offset + len(part)] = np.frombuffer(part, dtype=np.uint8)
            offset += len(part)
        if sys.byteorder == "big" and torch.empty((), dtype=DTYPES[dtype]).element_size() > 1:
            width = torch.empty((), dtype=DTYPES[dtype]).element_size()
            view[:] = view.reshape(-1, width)[:, ::-1].reshape(-1)
        wire_dtype = torch.int16 if dtype == "bfloat16" else DTYPES[dtype]
        if dtype == "bool":
            require(bool((raw <= 1).all()), f"tensor {name!r}: bool bytes must be 0 or 1")
        tensor = raw.view(wire_dtype).reshape(shape)
        if dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        if limits.require_finite and dtype in _FLOAT_NAMES:
            require(bool(torch.isfinite(tensor).all()), f"tensor {name!r} holds NaN or infinite values")
        tensors[name] = tensor
    if "comp" in header:
        try:
            tensors = decompress(tensors, header["comp"])
        except CompressionError as exc:
            raise ProtocolError(str(exc)) from None
    message = Message(MessageKind(header["kind"]), header["round"], tensors, header.get("meta", {}))
    return Envelope(header["src"], message)


def check_like(tensors: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> None:
    """Raise ProtocolError unless `tensors` has exactly the template's names, shapes and dtypes."""
    missing = sorted(set(template) - set(tensors))
    extra = sorted(set(tensors) - set(template))
    require(not missing and not extra, f"tensor names differ from the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, like in template.items():
        got = tensors[name]
        require(got.shape == like.shape, f"tensor {name!r}: shape {tuple(got.shape)} != model's {tuple(like.shape)}")
        require(got.dtype == like.dtype, f"tensor {name!r}: dtype {got.dtype} != model's {like.dtype}")
