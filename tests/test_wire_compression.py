import msgpack
import pytest
import torch

from p2pmoe.wire.codec import ProtocolError, decode, encode, frame_sizes
from p2pmoe.wire.compression import compression_error, parse_compression
from p2pmoe.wire.messages import Message, MessageKind


def _message(kind=MessageKind.MODEL_UPDATE):
    torch.manual_seed(0)
    return Message(kind, 1, {"w": torch.randn(64, 32), "ids": torch.arange(4)}, {"num_examples": 3})


@pytest.mark.parametrize("scheme, payload, tolerance", [("fp16", 64 * 32 * 2, 1e-3), ("int8", 64 * 32, 0.05)])
def test_compressed_round_trip_restores_float32_within_the_schemes_error(scheme, payload, tolerance):
    message = _message()
    frames = encode("a", message, compression={"*": scheme})
    assert frame_sizes(frames)[1] == payload + 4 * 8  # the int64 ids go uncompressed
    got = decode(frames).message.tensors
    assert got["w"].dtype == torch.float32 and torch.equal(got["ids"], message.tensors["ids"])
    err = (got["w"] - message.tensors["w"]).norm() / message.tensors["w"].norm()
    assert err < tolerance
    assert compression_error(message.tensors, scheme)["rel_l2"] == pytest.approx(float(err), rel=1e-4)


def test_int8_error_is_at_most_half_a_step():
    w = torch.linspace(-1, 1, 1000)
    stats = compression_error({"w": w}, "int8")
    assert stats["max_abs"] <= (2 / 255) / 2 + 1e-6


def test_compression_is_per_message_kind():
    mapping = parse_compression("model_update=int8, model_global=fp16")
    assert mapping == {"model_update": "int8", "model_global": "fp16"}
    plain = frame_sizes(encode("a", _message(MessageKind.EMBEDDING), compression=mapping))[1]
    assert plain == 64 * 32 * 4 + 32


@pytest.mark.parametrize("spec", ["zip", "model_update=lz4"])
def test_unknown_schemes_are_refused(spec):
    with pytest.raises(ValueError, match="unknown schemes"):
        parse_compression(spec)


@pytest.mark.parametrize(
    "comp",
    [
        {"scheme": "zstd", "tensors": {}},
        {"scheme": "int8", "tensors": {"w": [0.0, -1.0]}},
        {"scheme": "int8", "tensors": {"w": [float("nan"), 1.0]}},
        {"scheme": "int8", "tensors": {"missing": [0.0, 1.0]}},
        {"scheme": "fp16", "tensors": {"w": []}},  # w is uint8 on the wire, not float16
        "int8",
    ],
)
def test_lying_compression_headers_are_protocol_errors(comp):
    frames = encode("a", _message(), compression={"*": "int8"})
    header = msgpack.unpackb(frames[0], raw=False)
    header["comp"] = comp
    with pytest.raises(ProtocolError):
        decode([msgpack.packb(header), *frames[1:]])
