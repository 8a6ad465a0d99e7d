"""CURVE encryption and peer authentication for the transport.

Every node has a CURVE key pair. Its ROUTER is a CURVE server that only completes the
handshake with clients whose public key is on an allow-list (checked by a ZAP handler), and
its DEALERs are CURVE clients that only talk to a server holding the peer's secret key. The
ZAP handler names each accepted connection after the node id its key is listed under; the
transport reads that name (the message's "User-Id" property) and rejects any message whose
header claims another sender. Keys are z85 text, as pyzmq writes and reads them.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from p2pmoe.fsio import atomic_write_bytes

log = logging.getLogger("p2pmoe.security")

_DENIED_LOG_CAP = 1024  # distinct refused keys remembered so each is logged once


@dataclass(frozen=True)
class CurveSettings:
    """Where our key pair lives and which node ids may connect, with their public keys."""

    secret_key_file: Path
    public_key_file: Path
    allowed_public_keys: dict[str, bytes] = field(default_factory=dict)

    def keypair(self) -> tuple[bytes, bytes]:
        """(public, secret) z85 keys, refusing a public file that does not match the secret."""
        public, secret = zmq.auth.load_certificate(self.secret_key_file)
        if secret is None:
            raise ValueError(f"{self.secret_key_file} holds no secret key")
        listed, _ = zmq.auth.load_certificate(self.public_key_file)
        if listed != public:
            raise ValueError(f"{self.public_key_file} is not the public half of {self.secret_key_file}")
        return public, secret


def _certificate(public: bytes, secret: bytes | None = None) -> bytes:
    """A key file in the ZPL format that `zmq.auth.load_certificate` reads."""
    stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"
    lines = [f"#   ****  Generated on {stamp} by p2pmoe  ****"]
    if secret is None:
        lines.append("#   ZeroMQ CURVE Public Certificate: give it to the peers that should accept this node.")
    else:
        lines.append("#   ZeroMQ CURVE **Secret** Certificate: DO NOT share this file or loosen its permissions.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return ("\n".join(lines) + "\n").encode("ascii")


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write `name.key` (public, 0644) and `name.key_secret` (0600); never overwrite a key."""
    if not name or Path(name).name != name or name in {".", ".."}:
        raise ValueError(f"key name {name!r} must be a plain file name")
    directory = Path(directory)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to replace a key")
    public, secret = zmq.curve_keypair()
    atomic_write_bytes(secret_path, _certificate(public, secret), mode=0o600)
    atomic_write_bytes(public_path, _certificate(public), mode=0o644)
    return public_path, secret_path


def write_keys(directory: Path, names: list[str]) -> list[Path]:
    """Key pairs for `names` (the `p2pmoe keys --out DIR NAME...` command): every file written."""
    written: list[Path] = []
    for name in names:
        written.extend(generate_keypair(directory, name))
    return written


def read_public_key(path: Path) -> bytes:
    """The z85 public key in a key file (public or secret), for an allow-list entry."""
    public, _ = zmq.auth.load_certificate(path)
    return public


class _NamingAuthenticator(AsyncioAuthenticator):
    """ZAP handler whose User-Id for an accepted key is the node id it is listed under."""

    def __init__(self, context: zmq.Context, guard: CurveGuard) -> None:
        super().__init__(context, log=logging.getLogger("p2pmoe.security.zap"))
        self._guard = guard

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._guard.node_of(z85.encode(client_public_key)) or ""


class CurveGuard:
    """The CURVE state of one transport: its keys, the allow-list and the ZAP handler.

    Must be created in a running event loop (the ZAP handler is an asyncio task) and before
    any socket of `context` binds, or early connections would skip the allow-list.
    """

    def __init__(self, settings: CurveSettings, context: zmq.Context) -> None:
        self.public_key, self._secret_key = settings.keypair()
        self._allowed: dict[str, bytes] = dict(settings.allowed_public_keys)
        self._denied: set[bytes] = set()
        self._auth = _NamingAuthenticator(context, self)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def allow(self, node_id: str, public_key: bytes) -> None:
        """Let `node_id` connect with `public_key` (replacing any key it had)."""
        self._allowed[node_id] = public_key

    def node_of(self, public_key: bytes) -> str | None:
        """The node id listed for a z85 public key, or None."""
        return next((node for node, key in self._allowed.items() if key == public_key), None)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check: is this z85 client key on the allow-list?"""
        if self.node_of(key) is not None:
            return True
        if key not in self._denied:
            if len(self._denied) >= _DENIED_LOG_CAP:
                self._denied.clear()
            self._denied.add(key)
            log.warning("refused a CURVE client: key %s is not on the allow-list", key.decode("ascii", "replace"))
        return False

    def serve(self, socket: zmq.Socket) -> None:
        """Make `socket` (our ROUTER) a CURVE server."""
        socket.curve_secretkey = self._secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True

    def connect_to(self, socket: zmq.Socket, peer_id: str, public_key: bytes | None) -> None:
        """Make `socket` a CURVE client of `peer_id`, whose key is given or on the allow-list."""
        server_key = public_key or self._allowed.get(peer_id)
        if server_key is None:
            raise ValueError(f"CURVE is on but no public key is known for peer {peer_id!r}")
        self.allow(peer_id, server_key)
        socket.curve_secretkey = self._secret_key
        socket.curve_publickey = self.public_key
        socket.curve_serverkey = server_key

    def stop(self) -> None:
        self._auth.stop()
