"""A node's side of the round driver: every call into the method goes through here, one at a time.

`NodeRunner` is plain synchronous code, like the methods it wraps: the simulator and the daemon
both feed it events (a delivery, a failure, a lost peer, a deadline) and send what it returns.
It is the one place that
- holds deliveries that arrive while the method trains or evaluates, or that belong to a round
  the node has not started, and hands them over after the call returns (bounded: a peer cannot
  make the node hold unlimited messages; under full participation neither messages more than
  `MAX_ROUNDS_AHEAD` rounds ahead. Under partial participation a peer passes the rounds it
  sits out without waiting for anyone, so it may legitimately be any number of rounds ahead:
  there only the message and byte caps apply);
- turns a peer's ERROR reply into the method's `on_send_failed` event;
- answers a message the method refuses with an ERROR reply, and keeps a method bug from
  taking the daemon down (the simulator re-raises it: a bug there should fail the run).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from p2pmoe.methods.attacks import Adversary
from p2pmoe.methods.base import Method, SendFailure
from p2pmoe.wire.codec import ProtocolError
from p2pmoe.wire.messages import Message, MessageKind, Send

log = logging.getLogger("p2pmoe.driver")

T = TypeVar("T")
RNG_KEY = "driver.rng"
MAX_HELD_MESSAGES = 1024
MAX_HELD_BYTES = 512 * 2**20
MAX_ROUNDS_AHEAD = 2  # messages for rounds further ahead than this are refused, not held (full participation)


def error_reply(request: Message, reason: str) -> Message:
    """The ERROR answer to `request`: its kind, round and request id (meta.req) when it had one."""
    meta: dict[str, object] = {"reason": reason, "kind": request.kind.value}
    if "req" in request.meta:
        meta["req"] = request.meta["req"]
    return Message(MessageKind.ERROR, request.round, meta=meta)


def request_id(message: Message) -> int | None:
    """`meta.req` when it is an integer (never a bool), else None."""
    req = message.meta.get("req")
    return req if type(req) is int else None


def failure_of(error: Message) -> SendFailure | None:
    """The failure a peer's ERROR reports, or None when it names no kind we could have sent."""
    try:
        kind = MessageKind(error.meta.get("kind"))
    except ValueError:
        return None
    return SendFailure(kind, error.round, str(error.meta.get("reason", ""))[:500], "refused", request_id(error))


def _payload_bytes(message: Message) -> int:
    return sum(t.numel() * t.element_size() for t in message.tensors.values())


def _on_cpu(send: Send) -> Send:
    """The codec always sees CPU tensors, wherever the model trains."""
    tensors = send.message.tensors
    if all(t.device.type == "cpu" for t in tensors.values()):
        return send
    moved = {name: t.detach().to("cpu") for name, t in tensors.items()}
    return Send(send.dst, Message(send.message.kind, send.message.round, moved, send.message.meta))


PEER_TEXT_LIMIT = 200


def clip(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """Text that came from a peer, cut to `limit` characters for a log line (a peer must not
    turn one message into a megabyte of log)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class RateLimitedLog:
    """Log the first few lines of each kind, then every `every`-th: a flood of bad messages
    must not turn into a flood of log lines."""

    def __init__(self, first: int = 5, every: int = 1000, logger: logging.Logger = log) -> None:
        self.first, self.every, self.logger = first, every, logger
        self.counts: Counter[str] = Counter()

    def warning(self, key: str, text: str, *args: object) -> None:
        self.log(logging.WARNING, key, text, *args)

    def error(self, key: str, text: str, *args: object) -> None:
        self.log(logging.ERROR, key, text, *args)

    def log(self, level: int, key: str, text: str, *args: object) -> None:
        self.counts[key] += 1
        n = self.counts[key]
        if n <= self.first or n % self.every == 0:
            self.logger.log(level, text + (f" ({n} so far)" if n > self.first else ""), *args)


@dataclass(frozen=True)
class _Held:
    src: str
    message: Message
    size: int
    phase: int  # the phase it arrived with (see `CausedSend`)


@dataclass(frozen=True)
class _HeldEvent:
    """A failure or a membership change that arrived while the method was busy."""

    call: Callable[[], list[Send]]


@dataclass(frozen=True)
class CausedSend(Send):
    """A send that answers a message the runner held and handed over later: `phase` is one
    more than the held message's, so the simulator counts the causal depth of a round's
    messages the same whether a message waited in the runner or not (the daemon, which has
    no phases, sends it as any other)."""

    phase: int = 0


class NodeRunner:
    """Serialises every call into one node's method and keeps its round bookkeeping.

    The driver runs blocking calls (training, evaluation), which may run in a worker thread,
    through `blocking_call`, which marks the runner busy before the call can start; every
    event that arrives meanwhile (a delivery, a failed send, a peer lost or back) is held and
    handed over by `start` (or `resume`) once the call has returned, so calls into the method
    never overlap: the held failures and membership changes (they belong to no round) and the
    messages of rounds already started, in arrival order, then the new round's start, then
    its messages.
    """

    def __init__(
        self,
        node_id: str,
        method: Method,
        strict: bool = False,
        seed: int = 0,
        accounting: bool = False,
        fork_rng: bool = True,
        adversary: Adversary | None = None,
    ) -> None:
        self.node_id = node_id
        self.method = method
        self.adversary = adversary  # an attacker's lies (issue 30): it sees what arrives and rewrites what leaves
        self.strict = strict
        self.accounting = accounting  # --train none: the method is never asked to train or evaluate
        # The node's own stream of torch's global RNG (dropout, sampling): a node draws the same
        # numbers whether it runs alone in a daemon or beside others in the simulator.
        # `fork_rng` False runs the blocking calls on the process's stream as it is: for a
        # driver that runs several nodes' calls at once (the global generator is one per
        # process) and makes sure none of them draws from it (`SimNetwork` with workers).
        self.fork_rng = fork_rng
        self._rng = torch.Generator().manual_seed(seed).get_state()
        self.round = -1
        self.sat_out = False  # the current round is one this node was not sampled for
        self._busy = False
        self._held: list[_Held | _HeldEvent] = []
        self._held_bytes = 0
        self.rejected = RateLimitedLog()

    # -- events in, sends out -------------------------------------------------------------------

    def deliver(self, src: str, message: Message, phase: int = 0) -> list[Send]:
        """A validated message from `src`: handed to the method now, or held for later.
        `phase` (the simulator's causal depth of the message) travels with a held message."""
        if message.kind == MessageKind.ERROR:
            failure = failure_of(message)
            return self.failed(src, failure) if failure is not None else []
        if self.adversary is not None:
            self.adversary.observe(src, message)
        if self.would_hold(message):
            return self._hold(src, message, phase)
        return self._call(lambda: self.method.on_message(src, message), src, message)

    def failed(self, dst: str, failure: SendFailure) -> list[Send]:
        """Something this node sent to `dst` came to nothing."""
        self.rejected.warning(
            f"failed:{failure.kind.value}", "%s: %s to %s failed (%s): %s", self.node_id, failure.kind.value, dst, failure.cause, failure.reason
        )
        return self._event(lambda: self.method.on_send_failed(dst, failure))

    def peer_lost(self, peer: str) -> list[Send]:
        return self._event(lambda: self.method.on_peer_lost(peer))

    def peer_joined(self, peer: str) -> list[Send]:
        return self._event(lambda: self.method.on_peer_joined(peer))

    def _event(self, call: Callable[[], list[Send]]) -> list[Send]:
        """Call into the method now, or after the blocking call in progress (held in order with
        deliveries; events are few, so they are not counted against the holding caps)."""
        if self._busy:
            self._held.append(_HeldEvent(call))
            return []
        return self._call(call)

    def deadline(self, round_index: int) -> list[Send]:
        return self._call(lambda: self.method.on_deadline(round_index))

    def exists(self, round_index: int) -> bool:
        """Whether this node is part of the swarm in the round (its churn window)."""
        return self.method.participation.exists(self.node_id, round_index)

    def takes_part(self, round_index: int) -> bool:
        """Whether the node is sampled for round r (partial participation); a server always is."""
        return self.method.takes_part(round_index)

    def start(self, round_index: int) -> list[Send]:
        """After training round r: first the held messages of earlier rounds (the method is still
        at its previous round), then `start_round(r)`, then the held messages of round r."""
        return self._enter(round_index, self.method.start_round, sat_out=False)

    def sit_out(self, round_index: int) -> list[Send]:
        """Round r for a node not sampled for it (it did not train): as `start`, with the
        method's `sit_out(r)` in place of `start_round(r)`."""
        return self._enter(round_index, self.method.sit_out, sat_out=True)

    def _enter(self, round_index: int, begin: Callable[[int], list[Send]], sat_out: bool) -> list[Send]:
        self._busy = False
        sends = self._release(self.round)
        self.round = round_index
        self.sat_out = sat_out
        sends += self._call(lambda: begin(round_index))
        return sends + self._release(round_index)

    def resume(self) -> list[Send]:
        """After evaluation: hand over what arrived for the current round meanwhile."""
        self._busy = False
        return self._release(self.round)

    def would_hold(self, message: Message) -> bool:
        """Whether `deliver` would hold `message` now rather than hand it to the method."""
        return message.kind != MessageKind.ERROR and (self._busy or message.round > self.round)

    @property
    def busy(self) -> bool:
        """A blocking call is in progress (or about to start): events are held."""
        return self._busy

    def blocking_call(self, fn: Callable[..., T], *args: object) -> Callable[[], T]:
        """Mark the runner busy now, on the driver's thread, and return `fn(*args)` as a call to
        run anywhere (a worker thread): nothing reaches the method until `start` or `resume`."""
        self._busy = True
        return functools.partial(fn, *args)  # a partial, not a lambda: a port may read which call it runs (`func`)

    def round_complete(self) -> bool:
        return self.method.round_complete()

    @property
    def holds_messages(self) -> bool:
        """Messages wait here for a later round or for a blocking call to end."""
        return bool(self._held)

    # -- blocking calls (the driver marks the runner busy around them) ---------------------------

    def train(self, round_index: int) -> dict[str, float]:
        return {} if self.accounting else self._with_own_rng(self.method.train_local, round_index)

    def evaluate(self) -> dict[str, float]:
        return {} if self.accounting else self._with_own_rng(self.method.evaluate)

    def diagnostics(self) -> dict[str, Any]:
        """The method's diagnostics of the round or, in a round the node was not sampled for,
        only `sat_out: true` (it decided nothing; what the method reports would be an earlier
        round's): the metrics rows show every round's sample, full participation adds nothing."""
        return {"sat_out": True} if self.sat_out else self.method.diagnostics()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's state and the node's RNG stream (`driver.rng`), for exact resumes."""
        return {**self.method.state_dict(), RNG_KEY: self._rng.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        rng = state.get(RNG_KEY)
        if rng is None or rng.dtype != torch.uint8 or rng.shape != self._rng.shape:
            raise ValueError(f"state has no usable {RNG_KEY!r}")
        self.method.load_state_dict({k: v for k, v in state.items() if k != RNG_KEY})
        self._rng = rng.clone()

    def _with_own_rng(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on this node's CPU RNG stream; the process's stream is left as it was.
        Project decision: CUDA's generator is not forked (per-node CUDA streams would need a
        device per node); runs on CUDA are reproducible per process, not across drivers."""
        if not self.fork_rng:
            return fn(*args)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            out = fn(*args)
            self._rng = torch.get_rng_state()
        return out

    # -- internals ----------------------------------------------------------------------------------

    def _call(self, event: Callable[[], list[Send]], src: str | None = None, message: Message | None = None) -> list[Send]:
        """Run one method call; a refusal of `message` becomes an ERROR reply to `src`."""
        try:
            sends = event()
        except ProtocolError as exc:
            if message is None or src is None:
                raise
            self.rejected.warning(f"rejected:{message.kind.value}", "%s: rejected %s from %s: %s", self.node_id, message.kind.value, src, exc)
            reply = Send(src, error_reply(message, str(exc)))
            try:  # the method stops waiting for what the refused message would have brought
                return [reply, *self._call(lambda: self.method.on_refused(src, message))]
            except ProtocolError:  # a method bug, not the peer's: the refusal still goes out
                log.exception("%s: on_refused raised after refusing %s from %s", self.node_id, message.kind.value, src)
                return [reply]
        except Exception:
            if self.strict:
                raise
            log.exception("%s: method error handling %s", self.node_id, message.kind.value if message else "an event")
            return [Send(src, error_reply(message, "internal error"))] if message is not None and src is not None else []
        if self.adversary is not None:
            sends = [self.adversary.lie(send) for send in sends]
        return [_on_cpu(send) for send in sends]

    def _hold(self, src: str, message: Message, phase: int) -> list[Send]:
        size = _payload_bytes(message)
        reason = None
        if message.round > self.round + MAX_ROUNDS_AHEAD and self.method.participation.everyone:
            reason = f"round {message.round} is more than {MAX_ROUNDS_AHEAD} rounds ahead of this node's {self.round}"
        elif sum(isinstance(h, _Held) for h in self._held) >= MAX_HELD_MESSAGES or self._held_bytes + size > MAX_HELD_BYTES:
            reason = f"this node already holds {len(self._held)} messages ({self._held_bytes} B) for later"
        if reason is not None:
            self.rejected.warning(f"dropped:{message.kind.value}", "%s: dropped %s from %s: %s", self.node_id, message.kind.value, src, reason)
            return [Send(src, error_reply(message, reason))]
        if "req" in message.meta and any(
            isinstance(h, _Held) and h.src == src and h.message.kind == message.kind and h.message.meta.get("req") == message.meta["req"] for h in self._held
        ):
            return []  # a retried request whose first copy is still held: answer it once
        self._held.append(_Held(src, message, size, phase))
        self._held_bytes += size
        return []

    def _release(self, up_to_round: int) -> list[Send]:
        """Hand over, in arrival order, the held events and the held messages of rounds <=
        `up_to_round`."""
        ready = [h for h in self._held if isinstance(h, _HeldEvent) or h.message.round <= up_to_round]
        if not ready:
            return []
        self._held = [h for h in self._held if isinstance(h, _Held) and h.message.round > up_to_round]
        self._held_bytes = sum(h.size for h in self._held if isinstance(h, _Held))
        sends: list[Send] = []
        for h in ready:
            # the runner now is in the message's round and not busy, so nothing is held again
            if isinstance(h, _HeldEvent):
                sends += self._call(h.call)
            else:
                sends += [CausedSend(s.dst, s.message, h.phase + 1) for s in self.deliver(h.src, h.message, h.phase)]
        return sends
