import msgpack
import pytest
import torch

from p2pmoe.wire.codec import Limits, MessageReader, ProtocolError, check_like, chunk_head, decode, encode, frame_sizes, wire_messages
from p2pmoe.wire.messages import Message, MessageKind


def _message() -> Message:
    return Message(
        MessageKind.MODEL_UPDATE,
        7,
        {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "h": torch.tensor([0.5, -2.0], dtype=torch.bfloat16),
            "mask": torch.tensor([True, False, True]),
            "ids": torch.tensor([1, 2, 3], dtype=torch.int64),
            "empty": torch.zeros(0, 5),
        },
        {"num_examples": 42},
    )


def test_round_trip_preserves_every_tensor_and_field():
    message = _message()
    env = decode(encode("node-1", message, Limits(frame_bytes=8)))
    assert env.src == "node-1"
    assert env.message.kind is MessageKind.MODEL_UPDATE and env.message.round == 7
    assert env.message.meta == {"num_examples": 42}
    for name, tensor in message.tensors.items():
        got = env.message.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor)


def test_large_payloads_travel_as_chunks_of_at_most_frame_bytes_across_tensor_boundaries():
    message = Message(MessageKind.EXPERT_RESPONSE, 0, {"x": torch.zeros(1000), "y": torch.ones(3, dtype=torch.int8)})
    frames = encode("a", message, Limits(frame_bytes=1024), xfer=b"ABCD")
    assert [len(f) for f in frames[1::2]] == [1024, 1024, 1024, 931]  # y's 3 bytes ride in x's last chunk
    assert msgpack.unpackb(frames[0], raw=False)["xfer"] == b"ABCD"
    assert [msgpack.unpackb(f, raw=False) for f in frames[2::2]] == [{"xfer": b"ABCD", "off": off} for off in (1024, 2048, 3072)]
    assert [len(m) for m in wire_messages(frames)] == [2, 2, 2, 2]  # every ZeroMQ message: a head and a payload
    header, payload = frame_sizes(frames)
    assert payload == 4003 and header == sum(len(f) for f in frames[0::2])
    single = encode("a", Message(MessageKind.EXPERT_RESPONSE, 0, {"x": torch.zeros(10)}))
    assert len(single) == 2 and "xfer" not in msgpack.unpackb(single[0], raw=False)  # one chunk: no transfer id


def test_non_contiguous_tensor_is_sent_by_value():
    t = torch.arange(6.0).reshape(2, 3).t()
    env = decode(encode("a", Message(MessageKind.EMBEDDING, 0, {"t": t})))
    assert torch.equal(env.message.tensors["t"], t)


def _header(frames):
    return msgpack.unpackb(frames[0], raw=False)


def _with_header(frames, **changes):
    header = _header(frames)
    header.update(changes)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda f: _with_header(f, v=99), "version"),
        (lambda f: _with_header(f, kind="steal_keys"), "unknown message kind"),
        (lambda f: _with_header(f, round="one"), "round"),
        (lambda f: f[:-1], "payload bytes"),
        (lambda f: [*f, b"extra"], "one head frame"),
        (lambda f: [f[0], f[1][:-4], *f[2:]], "bytes"),
        (lambda f: [b"\xc1\xff garbage", *f[1:]], "msgpack"),
        (lambda f: [], "empty"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(mutate, reason):
    frames = encode("a", _message())
    with pytest.raises(ProtocolError, match=reason):
        decode(mutate(frames))


def test_lying_size_in_the_tensor_table_is_rejected():
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.zeros(4)}))
    header = _header(frames)
    header["tensors"][0][3] = 999
    with pytest.raises(ProtocolError, match="declared 999 bytes"):
        decode([msgpack.packb(header), *frames[1:]])


def test_huge_declared_size_is_rejected_before_allocation():
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.zeros(4)}))
    header = _header(frames)
    header["tensors"][0][2] = [2**20, 2**20]
    header["tensors"][0][3] = 4 * 2**40
    with pytest.raises(ProtocolError, match="limit"):
        decode([msgpack.packb(header), *frames[1:]])


def test_disallowed_dtype_and_non_finite_values_are_rejected():
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.zeros(2)}))
    header = _header(frames)
    header["tensors"][0][1] = "object"
    with pytest.raises(ProtocolError, match="not allowed"):
        decode([msgpack.packb(header), *frames[1:]])
    nan = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.tensor([1.0, float("nan")])}))
    with pytest.raises(ProtocolError, match="NaN"):
        decode(nan)


def test_too_many_tensors_is_rejected():
    message = Message(MessageKind.EMBEDDING, 0, {f"t{i}": torch.zeros(1) for i in range(5)})
    with pytest.raises(ProtocolError, match="too many tensors"):
        decode(encode("a", message), Limits(max_tensors=4))


def test_check_like_names_the_offending_tensor():
    template = {"a": torch.zeros(2, 3)}
    check_like({"a": torch.ones(2, 3)}, template)
    with pytest.raises(ProtocolError, match="'a'.*shape"):
        check_like({"a": torch.zeros(3, 2)}, template)
    with pytest.raises(ProtocolError, match="'a'.*dtype"):
        check_like({"a": torch.zeros(2, 3, dtype=torch.float64)}, template)
    with pytest.raises(ProtocolError, match="missing"):
        check_like({}, template)


def test_check_like_bounds_by_the_own_scale_and_only_asks_finiteness_of_an_exploded_own_tensor():
    """A node rolling back from a NaN model to its own earlier state (weights of 5e3, say) must
    not be refused for a scale the NaN model does not have; a non-finite value still is."""
    with pytest.raises(ProtocolError, match="exceeds"):
        check_like({"a": torch.full((2,), 5e3)}, {"a": torch.zeros(2)})
    check_like({"a": torch.full((2,), 5e3)}, {"a": torch.tensor([float("nan"), 1.0])})
    with pytest.raises(ProtocolError, match="exceeds"):
        check_like({"a": torch.tensor([float("inf"), 1.0])}, {"a": torch.tensor([float("nan"), 1.0])})


@pytest.mark.parametrize("field, value", [("round", True), ("round", -1)])
def test_bools_and_negative_rounds_are_not_counts(field, value):
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {}))
    with pytest.raises(ProtocolError, match="round"):
        decode(_with_header(frames, **{field: value}))


def test_bool_in_a_shape_is_rejected():
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.zeros(1)}))
    header = _header(frames)
    header["tensors"][0][2] = [True]
    with pytest.raises(ProtocolError, match="bad shape"):
        decode([msgpack.packb(header), *frames[1:]])


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda f: [*f[:2], chunk_head(b"ABCD", 9), *f[3:]], "offset 9, expected 4"),
        (lambda f: [*f[:2], chunk_head(b"WXYZ", 4), *f[3:]], "another transfer"),
        (lambda f: [*f[:2], msgpack.packb({"xfer": b"AB", "off": 4}), *f[3:]], "chunk head must be"),
        (lambda f: [*f[:2], msgpack.packb({"xfer": b"ABCD", "off": -4}), *f[3:]], "chunk head must be"),
        (lambda f: f[:3], "without its payload"),
        (lambda f: [*f, chunk_head(b"ABCD", 16), b"\x00\x00\x80\x3f"], "chunks carry 20"),
        (lambda f: [f[0], b"", *f[2:]], "1 to max_frame_bytes"),
    ],
)
def test_chunks_must_continue_their_own_transfer_in_order(mutate, reason):
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.arange(4.0)}), Limits(frame_bytes=4), xfer=b"ABCD")
    assert torch.equal(decode(frames).message.tensors["x"], torch.arange(4.0))
    with pytest.raises(ProtocolError, match=reason):
        decode(mutate(frames))


@pytest.mark.parametrize("version", [1, 1.0, True, "2", [2], None])
def test_version_must_be_exactly_the_integer_2(version):
    frames = encode("a", Message(MessageKind.HELLO, 0))
    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        decode(_with_header(frames, v=version))


@pytest.mark.parametrize(
    "kind, meta, field",
    [
        (MessageKind.HELLO, {"reply": 1}, "meta.reply"),
        (MessageKind.HELLO, {"reply": False}, "meta.reply"),
        (MessageKind.HELLO, {"reply": "true"}, "meta.reply"),
        (MessageKind.EXPERT_RESPONSE, {"req": True}, "meta.req"),
        (MessageKind.EXPERT_REQUEST, {"req": 1.0}, "meta.req"),
        (MessageKind.EXPERT_REQUEST, {"req": -1}, "meta.req"),
        (MessageKind.HELLO, {"round": True}, "meta.round"),
        (MessageKind.HEARTBEAT, {"round": 2.0}, "meta.round"),
        (MessageKind.HEARTBEAT, {"round": -2}, "meta.round"),
        (MessageKind.HELLO, {"done": 1}, "meta.done"),
    ],
)
def test_meta_fields_that_nodes_act_on_have_one_type(kind, meta, field):
    with pytest.raises(ProtocolError, match=field):
        decode(encode("a", Message(kind, 0, meta=meta)))


def test_well_typed_meta_fields_pass():
    meta = {"round": -1, "done": False, "reply": True, "req": 2**64 - 1}
    assert decode(encode("a", Message(MessageKind.HELLO, 0, meta=meta))).message.meta == meta


def test_a_frame_over_max_frame_bytes_is_refused_and_senders_cannot_make_one():
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.zeros(2048)}), Limits(frame_bytes=8192))
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        decode(frames, Limits(frame_bytes=1024, max_frame_bytes=4096))
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Limits(frame_bytes=8 * 2**20)


def test_declared_payload_is_bounded_by_the_header_alone():
    header = {"v": 2, "kind": "embedding", "src": "a", "round": 0, "meta": {}, "tensors": [["x", "uint8", [1000], 1000]], "xfer": b"ABCD"}
    with pytest.raises(ProtocolError, match="exceeds the message limit 100"):
        MessageReader(msgpack.packb(header), Limits(max_message_bytes=100))
    assert MessageReader(msgpack.packb(header)).size == 1000  # what a receiver reserves before any chunk


def test_empty_tensor_with_huge_dimensions_is_refused():
    header = {"v": 2, "kind": "embedding", "src": "a", "round": 0, "meta": {}, "tensors": [["x", "float32", [0, 2**33, 2**33], 0]]}
    with pytest.raises(ProtocolError, match="exceeds the message limit"):
        decode([msgpack.packb(header)])


def test_reader_takes_chunks_and_checks_each_on_arrival():
    values = torch.arange(6, dtype=torch.float32)
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": values}), Limits(frame_bytes=6))  # splits floats
    reader = MessageReader(frames[0])
    for chunk in frames[1::2]:
        reader.feed(chunk)
    assert reader.complete and torch.equal(reader.finish().message.tensors["x"], values)
    bad = values.clone()
    bad[1] = float("nan")
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": bad}), Limits(frame_bytes=6))
    reader = MessageReader(frames[0])
    reader.feed(frames[1])
    with pytest.raises(ProtocolError, match="NaN"):
        reader.feed(frames[3])  # the second float is complete after the second chunk: checked at once
    assert not reader.complete


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_every_float_dtype_is_finite_checked(dtype):
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ProtocolError, match="NaN or infinite"):
            decode(encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.tensor([1.0, value]).to(dtype)})))


def test_check_like_bounds_magnitudes_by_the_models_own_scale():
    """Issue 26 N1: finite values far beyond the model's scale are refused; honest ones pass."""
    from p2pmoe.wire.codec import MAGNITUDE_RATIO, check_like

    own = {"w": torch.full((3, 4), 0.5), "step": torch.zeros(1, dtype=torch.int64)}
    check_like({"w": torch.full((3, 4), -2.0), "step": torch.tensor([10**12])}, own)  # 4x the own scale; integers are not bounded
    for value in (3e38, -3e38, 65504.0, float("nan")):
        with pytest.raises(ProtocolError, match="exceeds"):
            check_like({"w": torch.full((3, 4), value), "step": torch.zeros(1, dtype=torch.int64)}, own)
    check_like({"w": torch.full((3, 4), MAGNITUDE_RATIO)}, {"w": torch.zeros(3, 4)})  # a zero template still allows ratio x 1
