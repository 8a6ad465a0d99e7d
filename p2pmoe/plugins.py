"""What the method and task registries share: built-ins loaded on demand, listed in a fixed
order, and plugins: a user's methods and task families in their own modules or files.

A plugin is any module that calls `register_method` or `register_task` when imported, found
either through an installed distribution's entry point (groups `ENTRY_POINT_GROUPS`) or named
by the run (`[run] plugins`, `--plugins`: module names or paths of .py files). Nothing in the
package imports a plugin by name, so a user's method lives in the user's file.

Torch-free and registry-agnostic, so both registries (tasks below methods) use it without
importing each other.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ENTRY_POINT_GROUPS = ("p2pmoe.methods", "p2pmoe.tasks")
_entry_points_loaded = False


class PluginError(ValueError):
    """A plugin could not be found or failed while registering itself."""


def load_entry_points(force: bool = False) -> None:
    """Import every module that an installed distribution declares under `ENTRY_POINT_GROUPS`
    (once per process; `force` looks again)."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return
    _entry_points_loaded = True
    for group in ENTRY_POINT_GROUPS:
        for entry in importlib.metadata.entry_points(group=group):
            try:
                entry.load()
            except Exception as exc:
                raise PluginError(f"entry point {entry.name!r} ({entry.value}) of group {group}: {type(exc).__name__}: {exc}") from exc


def load_plugins(specs: str | None) -> None:
    """Import the comma-separated plugins of `specs`: module names (`my_pkg.my_method`) or paths
    of .py files (imported under their stem; a file already imported is not run twice)."""
    for spec in (s.strip() for s in (specs or "").split(",")):
        if spec:
            _load_one(spec)


def _load_one(spec: str) -> None:
    path = Path(spec)
    try:
        if path.suffix != ".py":
            importlib.import_module(spec)
            return
        if not path.is_file():
            raise PluginError(f"plugin {spec}: no such file")
        name = f"p2pmoe_plugin_{path.stem}"
        if name in sys.modules and Path(getattr(sys.modules[name], "__file__", "")) == path.resolve():
            return
        loader_spec = importlib.util.spec_from_file_location(name, path.resolve())
        assert loader_spec is not None and loader_spec.loader is not None  # a .py path always has a source loader
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {spec}: {type(exc).__name__}: {exc}") from exc


def ordered(registry: Mapping[str, T], builtins: Sequence[str], module_of: Callable[[T], str]) -> dict[str, T]:
    """Import every built-in module (each registers itself), then list the entries: built-ins in
    `builtins` order whichever was imported first, then plugins in registration order (the
    generated docs and `--help` must not depend on import order)."""
    for module in builtins:
        importlib.import_module(module)
    load_entry_points()
    rank = {module: i for i, module in enumerate(builtins)}
    return dict(sorted(registry.items(), key=lambda item: rank.get(module_of(item[1]), len(rank))))
