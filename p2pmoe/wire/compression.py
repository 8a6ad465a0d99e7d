"""Lossy compression of float32 tensors on the wire: fp16 or 8-bit uniform per tensor.

A sender's driver compresses the tensors of the message kinds its config names; the header
says which tensors were compressed and how, so the receiver restores float32 before any
method sees them. The error each scheme introduces is measured by `compression_error`;
`ErrorFeedback` lets a sender carry that error into its next message instead of losing it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

SCHEMES = ("none", "fp16", "int8")
FP16_MAX = 65504.0  # the largest finite float16: a float32 beyond it would arrive as inf
_INT8_LEVELS = 255  # uint8 q in 0..255 restores to min + q * scale


class CompressionError(ValueError):
    """A compression field in a header that cannot be honoured."""


def parse_compression(spec: str) -> dict[str, str]:
    """'fp16' (every kind) or 'model_update=int8,model_global=fp16' -> {kind or '*': scheme}."""
    spec = spec.strip()
    if not spec or spec == "none":
        return {}
    if "=" not in spec:
        pairs = [("*", spec)]
    else:
        pairs = [tuple(p.strip() for p in item.split("=", 1)) for item in spec.split(",")]  # type: ignore[misc]
    mapping = dict(pairs)
    bad = sorted(v for v in mapping.values() if v not in SCHEMES)
    if bad:
        raise ValueError(f"compression {spec!r}: unknown schemes {bad}; choose from {list(SCHEMES)}")
    return {k: v for k, v in mapping.items() if v != "none"}


def scheme_for(kind: str, compression: Mapping[str, str]) -> str:
    """The scheme the config gives `kind` ('none' when it names none)."""
    return compression.get(kind, compression.get("*", "none"))


def int8_params_ok(lo: Any, scale: Any) -> bool:
    """Whether int8 parameters restore only finite float32 values.

    Restoration computes `q * scale + min` in float32 for q in 0..255; the result is monotone
    in q, so it is finite for every q exactly when min, scale and min + 255 * scale are finite
    in float32 (a float64 that is finite may still overflow float32: 1e39 does).
    """
    if not (isinstance(lo, float) and isinstance(scale, float) and math.isfinite(lo) and math.isfinite(scale) and scale > 0):
        return False
    with np.errstate(over="ignore"):
        lo32, scale32 = np.float32(lo), np.float32(scale)
        top = np.float32(_INT8_LEVELS) * scale32 + lo32
    return bool(np.isfinite(lo32) and np.isfinite(scale32) and scale32 > 0 and np.isfinite(top))


def compress(tensors: Mapping[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Compressed tensors and the header field that lets the receiver restore them.

    Only float32 tensors are compressed, and only those the scheme can carry without making
    a value non-finite (fp16: |x| <= 65504; int8: finite min and range): any other tensor goes
    as it is, which the header says by not listing it, so a receiver never has to reject a
    message because its sender compressed it.
    """
    if scheme == "none":
        return dict(tensors), {}
    out: dict[str, torch.Tensor] = {}
    params: dict[str, list[float]] = {}
    for name, tensor in tensors.items():
        out[name] = tensor
        if tensor.dtype != torch.float32:
            continue
        if scheme == "fp16":
            if tensor.numel() == 0 or float(tensor.abs().max()) <= FP16_MAX:  # NaN compares False: stays float32
                out[name] = tensor.to(torch.float16)
                params[name] = []
            continue
        lo = float(tensor.min()) if tensor.numel() else 0.0
        hi = float(tensor.max()) if tensor.numel() else 0.0
        scale = (hi - lo) / _INT8_LEVELS or 1.0
        if int8_params_ok(lo, scale):
            out[name] = torch.round((tensor - lo) / scale).clamp_(0, _INT8_LEVELS).to(torch.uint8)
            params[name] = [lo, scale]
    return out, {"scheme": scheme, "tensors": params}


def decompress(tensors: dict[str, torch.Tensor], field: Any) -> dict[str, torch.Tensor]:
    """Undo `compress` from its header field; CompressionError on anything inconsistent."""
    if not isinstance(field, dict) or field.get("scheme") not in ("fp16", "int8") or not isinstance(field.get("tensors"), dict):
        raise CompressionError("header field 'comp' must be {scheme: 'fp16'|'int8', tensors: {name: params}}")
    scheme, params = field["scheme"], field["tensors"]
    restored = dict(tensors)
    for name, values in params.items():
        if name not in tensors:
            raise CompressionError(f"compressed tensor {name!r} is not in the message")
        data = tensors[name]
        if scheme == "fp16":
            if data.dtype != torch.float16 or values != []:
                raise CompressionError(f"tensor {name!r}: fp16 compression needs a float16 tensor and no params")
            restored[name] = data.to(torch.float32)
            continue
        if data.dtype != torch.uint8 or not (isinstance(values, list) and len(values) == 2 and int8_params_ok(*values)):
            raise CompressionError(
                f"tensor {name!r}: int8 compression needs a uint8 tensor and float [min, scale > 0] with min + 255 * scale finite in float32"
            )
        lo, scale = values
        restored[name] = data.to(torch.float32) * scale + lo
    return restored


def round_trip(tensors: Mapping[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """What a receiver restores from `tensors` sent with `scheme`: the codec's own compress and
    decompress, so a sender can know exactly what its peers got."""
    compressed, field = compress(tensors, scheme)
    return decompress(compressed, field) if field else compressed


class ErrorFeedback:
    """Error feedback for a sender whose tensors go through a lossy scheme each round.

    `apply(x)` returns what to send, `x + residual`, and keeps as the new residual what the
    scheme will lose of it, `(x + residual) - round_trip(x + residual)`. The error of one round
    is thus sent in the next instead of dropped: over T rounds the receiver gets
    `sum(x_t) - residual_T` in all, whatever T, rather than an error that grows with T. The
    codec compresses the returned tensors with the very same `compress`, so the residual is
    exactly what the wire lost. The residual is sender-local state: checkpoint `residual`.
    """

    def __init__(self, scheme: str) -> None:
        if scheme not in SCHEMES or scheme == "none":
            raise ValueError(f"error feedback needs a lossy scheme ({', '.join(s for s in SCHEMES if s != 'none')}), got {scheme!r}")
        self.scheme = scheme
        self.residual: dict[str, torch.Tensor] = {}

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors to send this round (float32 ones corrected by the residual); updates it."""
        corrected = {name: t + self.residual[name] if name in self.residual else t for name, t in tensors.items()}
        restored = round_trip(corrected, self.scheme)
        self.residual = {name: corrected[name] - restored[name] for name, t in corrected.items() if t.dtype == torch.float32}
        return corrected


def compression_error(original: Mapping[str, torch.Tensor], scheme: str) -> dict[str, float]:
    """What a round trip through `scheme` does to `original`: relative L2 error over all
    float32 tensors together and the largest absolute error of any element."""
    restored = round_trip(original, scheme)
    num = den = worst = 0.0
    for name, tensor in original.items():
        if tensor.dtype != torch.float32:
            continue
        diff = (restored[name] - tensor).double()
        num += float(diff.pow(2).sum())
        den += float(tensor.double().pow(2).sum())
        worst = max(worst, float(diff.abs().max()) if diff.numel() else 0.0)
    return {"rel_l2": math.sqrt(num / den) if den else 0.0, "max_abs": worst}
