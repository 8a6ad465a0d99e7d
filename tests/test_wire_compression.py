import msgpack
import numpy as np
import pytest
import torch

from p2pmoe.wire.codec import Limits, ProtocolError, decode, encode, frame_sizes
from p2pmoe.wire.compression import ErrorFeedback, compress, compression_error, decompress, parse_compression
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


def _compressed_frames(kind: MessageKind, comp: object, payload: bytes) -> list[bytes]:
    """An int8-compressed message of 8 values whose header's comp field and bytes are chosen."""
    frames = encode("a", Message(kind, 0, {"w": torch.randn(8)}), compression={"*": "int8"})
    header = msgpack.unpackb(frames[0], raw=False)
    header["comp"] = comp
    return [msgpack.packb(header, use_bin_type=True), payload]


@pytest.mark.parametrize("kind", [MessageKind.EMBEDDING, MessageKind.EXPERT_RESPONSE, MessageKind.MODEL_UPDATE])
@pytest.mark.parametrize(
    "params",
    [
        [0.0, 3.0e38],  # the issue's case: 255 * 3e38 overflows float32
        [1.0e39, 1.0],  # finite as a float64, inf as a float32
        [-3.0e38, 3.0e36],  # min + 255 * scale = 4.65e38
        [0.0, 1.0e39],
        [0.0, 0.0],
        [0.0, 5e-324],  # a float64 subnormal: 0 in float32
        [0, 1],  # ints are not the floats the protocol names
        [True, 1.0],
        [0.0, 1.0, 2.0],
    ],
)
def test_int8_parameters_that_restore_non_finite_or_are_not_floats_are_refused(kind, params):
    with pytest.raises(ProtocolError, match="int8 compression needs"):
        decode(_compressed_frames(kind, {"scheme": "int8", "tensors": {"w": params}}, b"\xff" * 8))


def test_int8_extremes_that_stay_finite_are_taken_and_restored_values_are_checked():
    top = float(np.finfo(np.float32).max) / 256  # 255 * scale stays below float32's max
    got = decode(_compressed_frames(MessageKind.EMBEDDING, {"scheme": "int8", "tensors": {"w": [0.0, top]}}, b"\xff" * 8))
    assert bool(torch.isfinite(got.message.tensors["w"]).all())


def test_fp16_values_are_checked_after_restoring_and_the_sender_never_overflows():
    message = Message(MessageKind.EMBEDDING, 0, {"big": torch.tensor([1e5, 1.0]), "edge": torch.tensor([65504.0, -65504.0]), "ok": torch.ones(2)})
    frames = encode("a", message, compression={"*": "fp16"})
    header = msgpack.unpackb(frames[0], raw=False)
    assert set(header["comp"]["tensors"]) == {"edge", "ok"}  # beyond fp16's range: sent as float32
    got = decode(frames).message.tensors
    assert torch.equal(got["big"], message.tensors["big"]) and torch.equal(got["edge"], message.tensors["edge"])
    inf16 = np.array([np.inf, 1.0], dtype="<f2").tobytes()
    header["tensors"] = [["w", "float16", [2], 4]]
    header["comp"] = {"scheme": "fp16", "tensors": {"w": []}}
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        decode([msgpack.packb(header, use_bin_type=True), inf16])


def test_int8_sender_leaves_tensors_it_cannot_carry_uncompressed():
    huge = torch.tensor([-3.0e38, 3.0e38])
    frames = encode("a", Message(MessageKind.EMBEDDING, 0, {"huge": huge, "inf": torch.tensor([float("inf")])}), compression={"*": "int8"})
    assert msgpack.unpackb(frames[0], raw=False)["comp"]["tensors"] == {}
    assert torch.equal(decode(frames, Limits(require_finite=False)).message.tensors["huge"], huge)


def _dequant_quant(x: torch.Tensor) -> torch.Tensor:
    """dequant(quant(x)) with 8-bit per-tensor min/scale, written out by hand."""
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 255
    return torch.round((x - lo) / scale).clamp(0, 255).to(torch.uint8).to(torch.float32) * scale + lo


def test_int8_error_feedback_carries_the_residual_into_the_next_round():
    torch.manual_seed(0)
    x1, x2 = torch.randn(40, 7), torch.randn(40, 7)
    ef = ErrorFeedback("int8")

    sent1 = ef.apply({"phi": x1})
    assert torch.equal(sent1["phi"], x1)  # nothing to carry yet
    r1 = ef.residual["phi"]
    assert torch.allclose(r1, x1 - _dequant_quant(x1), atol=1e-6) and r1.abs().max() > 0

    sent2 = ef.apply({"phi": x2})
    assert torch.equal(sent2["phi"], x2 + r1)  # round 2 quantises x2 + residual
    assert torch.allclose(ef.residual["phi"], (x2 + r1) - _dequant_quant(x2 + r1), atol=1e-6)

    # What the wire delivers is the codec's own int8 round trip of what apply() returned.
    frames = encode("a", Message(MessageKind.EMBEDDING, 2, sent2), compression={"embedding": "int8"})
    delivered = decode(frames).message.tensors["phi"]
    assert torch.equal(delivered, sent2["phi"] - ef.residual["phi"])


def test_error_feedback_keeps_the_total_error_bounded_over_rounds():
    """Sum of what arrived = sum of what was meant - the last residual: the error does not grow."""
    gen = torch.Generator().manual_seed(1)
    ef = ErrorFeedback("int8")
    meant, arrived = torch.zeros(300), torch.zeros(300)
    plain = torch.zeros(300)
    for _ in range(50):
        x = torch.randn(300, generator=gen) * 0.01 + 1.0  # small moves around 1: int8 loses much
        meant += x
        compressed, field = compress(ef.apply({"w": x}), "int8")
        arrived += decompress(compressed, field)["w"]
        c2, f2 = compress({"w": x}, "int8")
        plain += decompress(c2, f2)["w"]
    assert torch.allclose(arrived, meant - ef.residual["w"], atol=1e-3)
    assert (meant - arrived).abs().max() < (meant - plain).abs().max()


def test_error_feedback_needs_a_lossy_scheme():
    with pytest.raises(ValueError, match="lossy"):
        ErrorFeedback("none")
