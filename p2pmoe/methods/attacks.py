"""Peers that lie inside the swarm (issue 30): an attacker follows the protocol exactly and only
its numbers lie. Tensor maths and message rewriting only: the node's runner passes every
message the method sends through `Adversary.lie` and every message it receives through
`Adversary.observe`, in the simulator and in a daemon alike.

`[run] attack` names the lie, `[run] attackers` the fraction of clients that tell it (chosen
by a seeded draw, `attacker_nodes`):
- `noise:SIGMA`: Gaussian noise of standard deviation SIGMA added to every tensor it shares;
- `sign-flip:SCALE`: every tensor it shares multiplied by -SCALE;
- `fill:VALUE`: every value it shares, gates included, set to VALUE (finite, of either sign):
  the crude attack of issue 26 N1 (`fill:3e38`, `fill:-65504`), which bounds on receipt stop;
- `label-flip`: it trains on permuted labels (class c becomes C - 1 - c), so what it sends
  looks like any other node's training result;
- `mimic-mean` (FedMoE-DA): the gate it publishes is the mean of the gates its neighbours
  published in the previous round, so that every neighbour's gate correlation selects it;
  `mimic:NODE` copies one victim's gate.
Lies combine with `+` (`mimic-mean+sign-flip:5`: chosen by every neighbour, then poisoned).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from p2pmoe.wire.messages import Message, MessageKind, Send

SHARED_KINDS = frozenset({MessageKind.MODEL_UPDATE, MessageKind.GOSSIP, MessageKind.EXPERT_RESPONSE, MessageKind.EMBEDDING})
"""What a numeric lie (noise, sign flip) changes: the tensors a node shares of its model."""


@dataclass(frozen=True)
class Attack:
    noise: float = 0.0
    flip: float = 0.0  # 0: no sign flip; else the scale
    fill: float | None = None  # every shared value set to this
    label_flip: bool = False
    mimic: str | None = None  # "mean" or a victim's node id

    @property
    def any(self) -> bool:
        return bool(self.noise or self.flip or self.label_flip or self.mimic) or self.fill is not None


def parse_attack(spec: str) -> Attack:
    """`noise:SIGMA`, `sign-flip:SCALE`, `fill:VALUE`, `label-flip`, `mimic-mean`, `mimic:NODE`, joined by `+`."""
    attack = Attack()
    for part in (p.strip() for p in re.split(r"\+(?=\s*[A-Za-z])", spec) if p.strip()):  # not the + of 3e+38
        name, _, value = part.partition(":")
        try:
            if name == "noise" and float(value) > 0:
                attack = replace(attack, noise=float(value))
                continue
            if name == "sign-flip" and float(value) > 0:
                attack = replace(attack, flip=float(value))
                continue
            if name == "fill" and math.isfinite(float(value)):
                attack = replace(attack, fill=float(value))
                continue
        except ValueError:
            pass
        if name == "label-flip" and not value:
            attack = replace(attack, label_flip=True)
        elif name == "mimic-mean" and not value:
            attack = replace(attack, mimic="mean")
        elif name == "mimic" and value:
            attack = replace(attack, mimic=value)
        else:
            raise ValueError(f"[run] attack: {part!r} is not noise:SIGMA, sign-flip:SCALE, fill:VALUE, label-flip, mimic-mean or mimic:NODE (joined by +)")
    return attack


def attacker_nodes(seed: int, clients: Sequence[str], fraction: float) -> frozenset[str]:
    """round(fraction * clients) attackers, drawn with SHA-256 of the seed (every process agrees)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"[run] attackers must be a fraction in [0, 1), got {fraction!r}")
    count = round(fraction * len(clients))
    digest = hashlib.sha256(f"p2pmoe.attackers:{seed}".encode()).digest()
    return frozenset(random.Random(int.from_bytes(digest[:8], "big")).sample(sorted(clients), count))


class Adversary:
    """One attacker's lies, applied to what its method sends."""

    def __init__(self, node: str, attack: Attack, seed: int) -> None:
        self.node, self.attack = node, attack
        self._noise = torch.Generator().manual_seed(seed)
        self._gates: dict[str, torch.Tensor] = {}  # the latest gate each neighbour published
        self.lies = 0  # messages changed so far (diagnostics and tests)

    def observe(self, src: str, message: Message) -> None:
        if message.kind == MessageKind.GATE_PUBLISH and "gate" in message.tensors:
            self._gates[src] = message.tensors["gate"].detach().clone()

    def lie(self, send: Send) -> Send:
        message = send.message
        tensors = message.tensors
        if message.kind == MessageKind.GATE_PUBLISH and self.attack.mimic and "gate" in tensors:
            copied = self._mimicked(tensors["gate"])
            if copied is None:
                return send
            tensors = {**tensors, "gate": copied}
        elif message.kind == MessageKind.GATE_PUBLISH and self.attack.fill is not None and "gate" in tensors:
            tensors = {**tensors, "gate": self._numbers(tensors["gate"])}
        elif message.kind in SHARED_KINDS and (self.attack.noise or self.attack.flip or self.attack.fill is not None):
            tensors = {name: self._numbers(t) for name, t in tensors.items()}
        else:
            return send
        self.lies += 1
        return Send(send.dst, Message(message.kind, message.round, tensors, message.meta))

    def _numbers(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        lied = tensor.to(torch.float32)
        if self.attack.fill is not None:
            return torch.full_like(tensor, self.attack.fill)
        if self.attack.flip:
            lied = -self.attack.flip * lied
        if self.attack.noise:
            lied = lied + self.attack.noise * torch.randn(lied.shape, generator=self._noise)
        return lied.to(tensor.dtype)

    def _mimicked(self, own: torch.Tensor) -> torch.Tensor | None:
        if self.attack.mimic == "mean":
            seen = [g for g in self._gates.values() if g.shape == own.shape]
            return torch.stack(seen).mean(dim=0).to(own.dtype) if seen else None
        victim = self._gates.get(str(self.attack.mimic))
        return victim.to(own.dtype) if victim is not None and victim.shape == own.shape else None


def flip_labels(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Class c becomes C - 1 - c: a label-flip attacker's training targets."""
    return (classes - 1) - labels
