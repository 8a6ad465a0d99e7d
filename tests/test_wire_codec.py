import msgpack
import pytest
import torch

from p2pmoe.wire.codec import Limits, ProtocolError, check_like, decode, encode, frame_sizes
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


def test_large_tensors_are_split_into_frames_of_at_most_frame_bytes():
    message = Message(MessageKind.EXPERT_RESPONSE, 0, {"x": torch.zeros(1000)})
    frames = encode("a", message, Limits(frame_bytes=1024))
    assert [len(f) for f in frames[1:]] == [1024, 1024, 1024, 928]
    header, payload = frame_sizes(frames)
    assert payload == 4000 and header == len(frames[0])


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
        (lambda f: f[:-1], "frames"),
        (lambda f: [*f, b"extra"], "frames"),
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


def test_frame_count_is_bounded_before_anything_is_parsed():
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"x": torch.zeros(64)}), Limits(frame_bytes=1))
    with pytest.raises(ProtocolError, match="too many frames"):
        decode(frames, Limits(max_frames=100))
