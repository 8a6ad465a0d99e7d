"""The one codec: a message is a msgpack header and its tensors' bytes, cut into wire messages
of at most `frame_bytes` payload bytes each.

Both drivers (daemon and simulator) encode with this module, so bytes counted in simulation
are the bytes on the wire. Decoding treats every byte as hostile: nothing is trusted until it
has been checked against the header, the limits and the dtype allow-list. No pickle.

Why chunks (protocol version 2, issue 26): libzmq hands a multipart message to the
application only once every frame of it has arrived, and keeps all of it meanwhile, so with
version 1's one-multipart-per-message a 64 MiB expert sat in libzmq's memory before the node
had read its header. In version 2 every ZeroMQ message is a head frame and at most one payload
frame: the first carries the header (and a first chunk), each later one a small chunk head
`{"xfer", "off"}` and the next bytes. libzmq then holds at most a few such messages per
connection, the receiver reserves a message's bytes against its budgets when the header
arrives, before the rest is sent, and a peer whose chunks keep arriving is visibly alive.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np
import torch

from p2pmoe.wire.compression import CompressionError, compress, decompress, scheme_for
from p2pmoe.wire.messages import Message, MessageKind

PROTOCOL_VERSION = 2
XFER_BYTES = 4  # a transfer id is this many bytes (msgpack bin): fixed, so a simulation counts the wire's bytes

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
    """What a receiver accepts. Each bound is checked as early as the bytes it bounds arrive."""

    max_message_bytes: int = 256 * 2**20
    max_tensors: int = 4096
    max_header_bytes: int = 1 * 2**20
    max_dims: int = 8
    # Issue 26 N8: ZMTP heartbeats see a frame only once all of it has arrived, so a frame must
    # cross a slow link well within HEARTBEAT_TIMEOUT (5 s): 256 KiB takes ~2 s at 1 Mbit/s.
    frame_bytes: int = 256 * 2**10  # payload bytes a sender puts in one wire message
    max_frame_bytes: int = 512 * 2**10  # ... and the most a receiver accepts in one
    require_finite: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.frame_bytes <= self.max_frame_bytes:
            raise ValueError(f"frame_bytes {self.frame_bytes} must lie in 1..max_frame_bytes ({self.max_frame_bytes}): receivers refuse bigger frames")

    @property
    def max_socket_frame_bytes(self) -> int:
        """The largest frame of any kind (header or tensor): what a socket's MAXMSGSIZE should be."""
        return max(self.max_frame_bytes, self.max_header_bytes)


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
    return memoryview(cast(Any, array)).cast("B")  # numpy arrays are buffers; its stubs do not say so


def _cut(pieces: Sequence[memoryview], size: int) -> list[bytes | memoryview]:
    """The concatenation of `pieces` in chunks of `size` bytes (the last one shorter).

    A chunk inside one piece is a view of it (sent zero-copy); only a chunk that spans two or
    more pieces is copied, which for a model's many small tensors is one join per chunk."""
    chunks: list[bytes | memoryview] = []
    parts: list[memoryview] = []
    filled = 0
    for piece in pieces:
        start = 0
        while start < len(piece):
            take = min(size - filled, len(piece) - start)
            parts.append(piece[start : start + take])
            filled += take
            start += take
            if filled == size:
                chunks.append(parts[0] if len(parts) == 1 else b"".join(parts))
                parts, filled = [], 0
    if parts:
        chunks.append(parts[0] if len(parts) == 1 else b"".join(parts))
    return chunks


def _packb(value: Any) -> bytes:
    packed = msgpack.packb(value, use_bin_type=True)
    assert isinstance(packed, bytes)  # packb without a stream returns bytes
    return packed


def chunk_head(xfer: bytes, offset: int) -> bytes:
    """The head frame of a chunk: which transfer, and where its bytes go in the payload."""
    return _packb({"xfer": xfer, "off": offset})


def encode(
    src: str, message: Message, limits: Limits = DEFAULT_LIMITS, compression: Mapping[str, str] | None = None, xfer: bytes = bytes(XFER_BYTES)
) -> list[bytes | memoryview]:
    """The frames of `message`, head and payload alternating: header, first chunk, then a
    chunk head and a chunk for each further `frame_bytes` of the tensors' bytes. Each (head,
    payload) pair travels as one ZeroMQ message (`wire_messages`); a message without tensor
    bytes is its header alone.

    `xfer` names the transfer when the payload needs more than one chunk: a sender gives each
    such message an id of its own (XFER_BYTES bytes) so that chunks of messages sent at the
    same time cannot be confused. `compression` maps message kinds (or '*') to a scheme of
    p2pmoe.wire.compression.
    """
    if len(xfer) != XFER_BYTES:
        raise ValueError(f"a transfer id is {XFER_BYTES} bytes, got {len(xfer)}")
    table: list[list[Any]] = []
    pieces: list[memoryview] = []
    kind = MessageKind(message.kind).value
    tensors, comp = compress(message.tensors, scheme_for(kind, compression or {}) if compression else "none")
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ProtocolError(f"tensor {name!r}: dtype {tensor.dtype} is not sendable")
        raw = _tensor_bytes(tensor)
        table.append([name, _DTYPE_NAMES[tensor.dtype], list(tensor.shape), len(raw)])
        pieces.append(raw)
    chunks = _cut(pieces, limits.frame_bytes)
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "src": src,
        "round": int(message.round),
        "meta": message.meta,
        "tensors": table,
    }
    if comp:
        header["comp"] = comp
    if len(chunks) > 1:
        header["xfer"] = xfer
    frames: list[bytes | memoryview] = [_packb(header)]
    offset = 0
    for i, chunk in enumerate(chunks):
        if i:
            frames.append(chunk_head(xfer, offset))
        frames.append(chunk)
        offset += len(chunk)
    return frames


def wire_messages(frames: Sequence[bytes | memoryview]) -> list[list[bytes | memoryview]]:
    """`encode`'s frames as the ZeroMQ messages they travel in: (head, payload) pairs."""
    return [list(frames[i : i + 2]) for i in range(0, len(frames), 2)]


def frame_sizes(frames: Sequence[bytes | memoryview]) -> tuple[int, int]:
    """(head bytes, payload bytes) of an encoded message: headers and chunk heads, tensor bytes."""
    return sum(len(f) for f in frames[0::2]), sum(len(f) for f in frames[1::2])


def require(condition: bool, reason: str) -> None:
    """Raise ProtocolError(reason) unless `condition`: for fixed reasons.

    A reason that quotes the input is an f-string, formatted before the call even when the
    check passes; the checks below that run for every message and frame say `if not ...:
    raise ProtocolError(...)` instead, so their reasons cost nothing until they fail.
    """
    if not condition:
        raise ProtocolError(reason)


def _is_count(value: Any) -> bool:
    """A non-negative int that is not a bool (msgpack gives True for a packed true)."""
    return type(value) is int and value >= 0


_CONTROL_KINDS = (MessageKind.HELLO.value, MessageKind.HEARTBEAT.value)


def _check_meta(kind: str, meta: dict[str, Any]) -> None:
    """The meta fields the transport and the daemon act on have exactly one type each.

    A request id is matched by value, and True == 1 in Python: a boolean must not pass for a
    count, nor 1.0 for an int, nor 1 for true.
    """
    if not ("req" not in meta or _is_count(meta["req"])):
        raise ProtocolError(f"meta.req must be a non-negative integer, not {meta.get('req')!r}")
    if not ("reply" not in meta or meta["reply"] is True):
        raise ProtocolError(f"meta.reply must be true when present, not {meta.get('reply')!r}")
    if kind in _CONTROL_KINDS:
        peer_round = meta.get("round", -1)
        if not (type(peer_round) is int and peer_round >= -1):
            raise ProtocolError(f"meta.round must be an integer >= -1, not {peer_round!r}")
        if not (isinstance(meta.get("done", False), bool)):
            raise ProtocolError(f"meta.done must be true or false, not {meta.get('done')!r}")


def _parse_table(header: dict[str, Any], limits: Limits) -> list[tuple[str, str, list[int], int]]:
    table = header.get("tensors")
    if not isinstance(table, list):
        raise ProtocolError("header field 'tensors' must be a list")
    if not (len(table) <= limits.max_tensors):
        raise ProtocolError(f"too many tensors: {len(table)} > {limits.max_tensors}")
    rows = []
    seen: set[str] = set()
    for i, row in enumerate(table):
        if not (isinstance(row, list) and len(row) == 4):
            raise ProtocolError(f"tensor entry {i} must be [name, dtype, shape, nbytes]")
        name, dtype, shape, nbytes = row
        if not (isinstance(name, str) and name not in seen):
            raise ProtocolError(f"tensor entry {i}: name must be a unique string")
        seen.add(name)
        if dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} not allowed")
        if not (isinstance(shape, list) and len(shape) <= limits.max_dims and all(_is_count(d) for d in shape)):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
        # an empty tensor's other dimensions still make strides: bound them as if it had elements
        if math.prod(max(d, 1) for d in shape) > limits.max_message_bytes:
            raise ProtocolError(f"tensor {name!r}: shape {shape} exceeds the message limit {limits.max_message_bytes}")
        itemsize = _ITEMSIZE[dtype]
        if not (_is_count(nbytes) and nbytes == math.prod(shape) * itemsize):
            raise ProtocolError(f"tensor {name!r}: declared {nbytes!r} bytes, shape {shape} of {dtype} needs {math.prod(shape) * itemsize}")
        rows.append((name, dtype, shape, nbytes))
    total = sum(r[3] for r in rows)
    if not (total <= limits.max_message_bytes):
        raise ProtocolError(f"message declares {total} bytes > limit {limits.max_message_bytes}")
    return rows


def _unpack_map(frame: bytes | memoryview, limits: Limits) -> dict[str, Any]:
    if not (len(frame) <= limits.max_header_bytes):
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {limits.max_header_bytes}")
    try:
        head = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from None
    require(isinstance(head, dict), "header must be a map")
    return cast(dict[str, Any], head)


def _check_header(header: dict[str, Any]) -> dict[str, Any]:
    version = header.get("v")
    if not (type(version) is int and version == PROTOCOL_VERSION):
        raise ProtocolError(f"unsupported protocol version {version!r} (speak {PROTOCOL_VERSION})")
    require(isinstance(header.get("src"), str), "header field 'src' must be a string")
    require(_is_count(header.get("round")), "header field 'round' must be a non-negative integer")
    require(isinstance(header.get("meta", {}), dict), "header field 'meta' must be a map")
    try:
        kind = MessageKind(header.get("kind"))
    except ValueError:
        raise ProtocolError(f"unknown message kind {header.get('kind')!r}") from None
    _check_meta(kind.value, header.get("meta", {}))
    xfer = header.get("xfer")
    if not (xfer is None or (type(xfer) is bytes and len(xfer) == XFER_BYTES)):
        raise ProtocolError(f"header field 'xfer' must be {XFER_BYTES} bytes (msgpack bin)")
    return header


@dataclass(frozen=True)
class ChunkHead:
    """The head of a wire message that continues a transfer: its id and the payload offset."""

    xfer: bytes
    offset: int


def _as_chunk(head: dict[str, Any]) -> ChunkHead:
    xfer, offset = head.get("xfer"), head.get("off")
    if not (type(xfer) is bytes and len(xfer) == XFER_BYTES and _is_count(offset)):
        raise ProtocolError(f"a chunk head must be {{'xfer': {XFER_BYTES} bytes, 'off': a non-negative integer}}")
    return ChunkHead(xfer, cast(int, offset))


def read_head(frame: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> MessageReader | ChunkHead:
    """The head frame of a wire message: a message header (a reader for its payload) or a
    chunk head. A map with a `kind` is a header; anything else must be a chunk head."""
    head = _unpack_map(frame, limits)
    if "kind" in head or "v" in head:
        return MessageReader(head, limits)
    return _as_chunk(head)


_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
_NUMPY_FLOATS: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "float64": np.dtype("<f8")}
_BF16_EXPONENT = 0x7F80  # bfloat16 words whose exponent bits are all set are inf or NaN
_NO_BYTES = np.empty(0, dtype=np.uint8)


def _all_finite(data: np.ndarray, dtype: str) -> bool:
    """Whether the little-endian `dtype` elements in the bytes `data` are all finite.

    numpy, not torch: on a 2 MiB frame still in cache np.isfinite(...).all() ran at ~50 GB/s
    here, torch.isfinite at ~1 GB/s.
    """
    if dtype == "bfloat16":
        return not bool(((data.view("<u2") & _BF16_EXPONENT) == _BF16_EXPONENT).any())
    return bool(np.isfinite(data.view(_NUMPY_FLOATS[dtype])).all())


class MessageReader:
    """Builds one message from its payload chunks as they arrive, checking each on arrival.

    Why chunk by chunk: a transport copies each chunk straight into its tensors' buffers (the
    one copy out of libzmq), stops at the first chunk that breaks the message instead of after
    the last, and checks the new values while they are still in cache. `decode` drives it from
    a list of frames, so the simulator and the wire share every check.

    Use: `feed(chunk)` for each payload frame in order; once `complete`, `finish()` gives the
    Envelope. `size` is the payload the header declares (what a receiver reserves) and
    `transfer` the header's transfer id (None: the payload is one chunk). Every method raises
    ProtocolError on bad input.
    """

    def __init__(self, header: bytes | memoryview | dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._header = _check_header(header if isinstance(header, dict) else _unpack_map(header, limits))
        self._rows = _parse_table(self._header, limits)
        self.size = sum(r[3] for r in self._rows)
        self.transfer: bytes | None = self._header.get("xfer")
        self.received = 0
        self._tensors: dict[str, torch.Tensor] = {}
        self._row = -1
        self._bytes = _NO_BYTES
        self._filled = self._checked = 0
        self._open_rows()

    @property
    def compressed(self) -> bool:
        """Whether finish() restores compressed tensors (a pass over their values)."""
        return "comp" in self._header

    @property
    def complete(self) -> bool:
        """Whether every payload byte the header declares has arrived."""
        return self.received == self.size

    @property
    def src(self) -> str:
        return cast(str, self._header["src"])

    @property
    def meta(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._header.get("meta", {}))

    def feed(self, chunk: bytes | memoryview | np.ndarray) -> None:
        """The next payload chunk: copied into its tensors, the elements it completes checked."""
        data = chunk if isinstance(chunk, np.ndarray) else np.frombuffer(chunk, dtype=np.uint8)
        nbytes = data.size
        if not (0 < nbytes <= self.limits.max_frame_bytes):
            raise ProtocolError(f"a payload chunk must hold 1 to max_frame_bytes ({self.limits.max_frame_bytes}) bytes, not {nbytes}")
        if not (self.received + nbytes <= self.size):
            raise ProtocolError(f"header declares {self.size} payload bytes, chunks carry {self.received + nbytes}")
        self.received += nbytes
        start = 0
        while start < nbytes:
            name, dtype, _, declared = self._rows[self._row]
            take = min(declared - self._filled, nbytes - start)
            self._bytes[self._filled : self._filled + take] = data[start : start + take]
            self._filled += take
            start += take
            whole = self._filled - self._filled % _ITEMSIZE[dtype]
            if whole > self._checked:  # check the elements this chunk completed
                fresh = self._bytes[self._checked : whole]
                if dtype == "bool":
                    if not (int(fresh.max()) <= 1):
                        raise ProtocolError(f"tensor {name!r}: bool bytes must be 0 or 1")
                elif dtype in _FLOAT_NAMES and self.limits.require_finite:
                    if not (_all_finite(fresh, dtype)):
                        raise ProtocolError(f"tensor {name!r} holds NaN or infinite values")
                self._checked = whole
            self._open_rows()

    def finish(self) -> Envelope:
        """The message, once every payload byte the header declares has arrived."""
        if not self.complete:
            raise ProtocolError(f"header declares {self.size} payload bytes, {self.received} arrived")
        tensors = self._tensors
        if "comp" in self._header:
            try:
                tensors = decompress(tensors, self._header["comp"])
            except CompressionError as exc:
                raise ProtocolError(str(exc)) from None
            for name in self._header["comp"]["tensors"]:  # every value is checked as the receiver will use it
                restored = tensors[name].numpy().reshape(-1).view(np.uint8)
                if not (not self.limits.require_finite or _all_finite(restored, "float32")):
                    raise ProtocolError(f"tensor {name!r} restores to NaN or infinite values")
        header = self._header
        return Envelope(header["src"], Message(MessageKind(header["kind"]), header["round"], tensors, header.get("meta", {})))

    def _open_rows(self) -> None:
        """Close every tensor whose bytes have all come and move to the next that expects some."""
        while self._row < len(self._rows) and (self._row < 0 or self._filled == self._rows[self._row][3]):
            if self._row >= 0:
                self._close_row()
            self._row += 1
            if self._row < len(self._rows):
                # numpy, not torch.empty: numpy asks for transparent huge pages on big buffers,
                # and the first write into 4 KiB pages ran at 0.8 GB/s here against 4-6 GB/s
                self._bytes = np.empty(self._rows[self._row][3], dtype=np.uint8)  # no zero fill: chunks fill it
                self._filled = self._checked = 0

    def _close_row(self) -> None:
        name, dtype, shape, nbytes = self._rows[self._row]
        width = _ITEMSIZE[dtype]
        if sys.byteorder == "big" and width > 1:
            self._bytes[:] = self._bytes.reshape(-1, width)[:, ::-1].reshape(-1)
        # torch.from_numpy gives an empty array stride 0, which a dtype view refuses
        raw = torch.from_numpy(self._bytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensor = raw.view(torch.int16 if dtype == "bfloat16" else DTYPES[dtype]).reshape(shape)
        self._tensors[name] = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def decode(frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Validate and decode `encode`'s frames (head and payload alternating) into an Envelope,
    or raise ProtocolError saying why."""
    require(len(frames) >= 1, "empty message")
    reader = MessageReader(frames[0], limits)
    if len(frames) > 1:
        reader.feed(frames[1])
    for i in range(2, len(frames), 2):
        require(reader.transfer is not None, "a message without 'xfer' in its header is one head frame and at most one payload frame")
        chunk = _as_chunk(_unpack_map(frames[i], limits))
        require(chunk.xfer == reader.transfer, "a chunk of another transfer")
        if not (chunk.offset == reader.received):
            raise ProtocolError(f"a chunk at offset {chunk.offset}, expected {reader.received}")
        require(i + 1 < len(frames), "a chunk head without its payload frame")
        reader.feed(frames[i + 1])
    return reader.finish()


MAGNITUDE_RATIO = 1000.0
"""How far a peer's floating-point values may exceed the receiver's own: at most this many times
the largest magnitude of the template tensor (or of 1, whichever is larger). Finite is not
enough: float32 values of 3e38 pass every finiteness check and overflow the first matmul that
trains on them. Project decision: 1000 leaves honest updates (weights within a few times the
node's own) far inside the bound and stops values that only an attacker or a broken peer sends."""


def check_like(tensors: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], magnitude_ratio: float = MAGNITUDE_RATIO) -> None:
    """Raise ProtocolError unless `tensors` has exactly the template's names, shapes and dtypes,
    and no floating-point value larger in magnitude than `magnitude_ratio` times the template
    tensor's largest (or 1)."""
    missing = sorted(set(template) - set(tensors))
    extra = sorted(set(tensors) - set(template))
    if not (not missing and not extra):
        raise ProtocolError(f"tensor names differ from the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, like in template.items():
        got = tensors[name]
        if not (got.shape == like.shape):
            raise ProtocolError(f"tensor {name!r}: shape {tuple(got.shape)} != model's {tuple(like.shape)}")
        if not (got.dtype == like.dtype):
            raise ProtocolError(f"tensor {name!r}: dtype {got.dtype} != model's {like.dtype}")
        if got.is_floating_point() and got.numel():
            own = float(like.detach().abs().max()) if like.numel() else 1.0
            # An own tensor that is not finite has no scale to compare with (a node rolling back
            # from an exploded model to its own earlier state): then only finiteness is asked.
            bound = magnitude_ratio * max(1.0, own) if math.isfinite(own) else math.inf
            largest = float(got.detach().abs().max())
            if not largest <= bound or not math.isfinite(largest):  # also refuses NaN
                # the bound itself is not told: it would show a peer the largest of this node's own values
                raise ProtocolError(f"tensor {name!r}: a value of magnitude {largest:.3g} exceeds {magnitude_ratio:g}x the model's own scale")
