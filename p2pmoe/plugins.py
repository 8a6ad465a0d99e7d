"""What the method and task registries share: built-ins loaded on demand, listed in a fixed order.

Torch-free and registry-agnostic, so both registries (tasks below methods) use it without
importing each other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def ordered(registry: Mapping[str, T], builtins: Sequence[str], module_of: Callable[[T], str]) -> dict[str, T]:
    """Import every built-in module (each registers itself), then list the entries: built-ins in
    `builtins` order whichever was imported first, then plugins in registration order (the
    generated docs and `--help` must not depend on import order)."""
    for module in builtins:
        importlib.import_module(module)
    rank = {module: i for i, module in enumerate(builtins)}
    return dict(sorted(registry.items(), key=lambda item: rank.get(module_of(item[1]), len(rank))))
