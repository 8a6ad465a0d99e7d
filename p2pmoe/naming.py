"""Node names shared by every driver, topology file and run folder."""

from __future__ import annotations

SERVER_ID = "server"


def client_ids(count: int) -> list[str]:
    """Stable node names: node-00, node-01, ... (zero-padded so they sort)."""
    width = max(2, len(str(count - 1)))
    return [f"node-{i:0{width}d}" for i in range(count)]
