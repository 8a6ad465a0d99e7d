"""Finding peers on a LAN by mDNS/DNS-SD (python-zeroconf), for `p2pmoe node --mdns`.

A node announces one service of type `_p2pmoe._tcp.local.` whose TXT properties say its node
id, the address its ROUTER listens on and its experiment hash, and browses for the others.
What it hears is handed to `found(node, address, config)`. mDNS is unauthenticated even
under CURVE (anyone on the LAN may announce any id with the public hash), so the daemon
treats an announcement as a third party's `roster` entry: it checks the hash, the id and
the address, only fills a gap, and under CURVE a peer's own authenticated hello re-points a
link that an announcement sent astray. Multicast stays on the interface of the announced
address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE = "_p2pmoe._tcp.local."
RESOLVE_MS = 2000  # how long one announcement is given to resolve
log = logging.getLogger("p2pmoe.mdns")

Found = Callable[[str, str, str], None]


def host_and_port(address: str) -> tuple[str, int]:
    """`tcp://192.0.2.10:5550` -> ("192.0.2.10", 5550); mDNS needs a literal IPv4 address."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        raise ValueError(f"--mdns needs a tcp://IP:PORT address to announce, got {address!r}")
    try:
        ipaddress.IPv4Address(parts.hostname)
    except ValueError:
        raise ValueError(f"--mdns announces a literal IPv4 address: give --advertise tcp://IP:PORT (got {address!r})") from None
    return parts.hostname, parts.port


class MdnsPeers:
    """Announce this node and report every other node of the experiment that announces itself."""

    def __init__(self, node: str, address: str, config: str, found: Found) -> None:
        self.node, self.address, self.config, self._found = node, address, config, found
        self.host, self.port = host_and_port(address)
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._lookups: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._zeroconf = AsyncZeroconf(interfaces=[self.host])
        # the instance name carries the hash prefix: two experiments on one LAN never collide
        name = f"{self.node}-{self.config[:12]}.{SERVICE_TYPE}"
        properties = {"node": self.node, "address": self.address, "config": self.config}
        self._info = AsyncServiceInfo(SERVICE_TYPE, name, addresses=[ipaddress.IPv4Address(self.host).packed], port=self.port, properties=properties)
        await self._zeroconf.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        log.info("%s: announcing %s by mDNS and looking for peers", self.node, self.address)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_MS):
            return
        props = {k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace") for k, v in info.properties.items()}
        node, address, config = props.get("node", ""), props.get("address", ""), props.get("config", "")
        if node and node != self.node:
            self._found(node, address, config)

    async def close(self) -> None:
        for task in list(self._lookups):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zeroconf is not None:
            if self._info is not None:
                await self._zeroconf.async_unregister_service(self._info)
            await self._zeroconf.async_close()
