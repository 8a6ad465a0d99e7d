"""Message types shared by every method and both drivers.

A message is what a method says, not how it travels: a kind, the round it belongs to, a
small metadata map and named tensors. The codec turns it into frames; drivers move frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class MessageKind(str, Enum):  # noqa: UP042 - StrEnum would change str() and format() of members to the bare value; kept as is
    """Every kind a node may send. The string value is what goes on the wire."""

    HELLO = "hello"
    HEARTBEAT = "heartbeat"
    ERROR = "error"
    GATE_PUBLISH = "gate_publish"
    EXPERT_REQUEST = "expert_request"
    EXPERT_RESPONSE = "expert_response"
    EMBEDDING = "embedding"
    MODEL_UPDATE = "model_update"
    MODEL_GLOBAL = "model_global"
    AGGREGATION_PLAN = "aggregation_plan"
    GOSSIP = "gossip"
    STATUS = "status"
    ROSTER = "roster"


@dataclass(frozen=True)
class Message:
    """One protocol message: the unit a method emits and receives."""

    kind: MessageKind
    round: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Send:
    """A method's request to deliver `message` to the node named `dst`."""

    dst: str
    message: Message
