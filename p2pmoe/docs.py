"""Option tables and method lists generated from the declarations (`p2pmoe methods`).

docs/methods.md holds the markdown between `<!-- options:begin -->` and `<!-- options:end -->`;
a test checks that it equals what this module writes, so docs and code cannot disagree.
"""

from __future__ import annotations

from p2pmoe.methods.registry import all_methods
from p2pmoe.options import markdown_table
from p2pmoe.settings import RunOptions
from p2pmoe.tasks.base import all_tasks

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def methods_markdown() -> str:
    """Every option table: `[run]`, each task family's `[task]`, each method's `[method]`."""
    parts = ["### Common options (`[run]`)", "", markdown_table(RunOptions)]
    for task in all_tasks().values():
        parts += ["", f"### Task family `{task.name}` (`[task]`): data {', '.join(task.data)}", "", task.summary + ".", ""]
        parts.append(markdown_table(task.options))
    seen: set[tuple[type, tuple[str, ...]]] = set()
    for spec in all_methods().values():
        parts += ["", f"### Method `{spec.name}` (tasks: {', '.join(spec.tasks)})", "", spec.summary + "."]
        if spec.variant_of is not None and spec.pinned:
            fixed = ", ".join(f"`{k}` = `{v}`" for k, v in spec.pinned.items())
            parts += ["", f"A variant of `{spec.variant_of}` that fixes {fixed}."]
        own = tuple(info.name for info in spec.own_options())
        if not own:
            parts += ["", "No options of its own."]
        elif (spec.options, own) in seen:
            parts += ["", "Options as the table above (same `[method]` keys and flags)."]
        else:
            parts += ["", markdown_table(spec.options, spec.flag_prefix, skip=spec.pinned)]
            seen.add((spec.options, own))
    return "\n".join(parts)


def methods_text() -> str:
    """A terminal listing: each method, where it runs, whether it has a server, its options."""
    lines = []
    for spec in all_methods().values():
        options = ", ".join(info.name for info in spec.own_options()) or "-"
        server = "server" if spec.build_server is not None else "no server"
        lines.append(f"{spec.name:20} {'/'.join(spec.tasks):22} {server:10} options: {options}")
        lines.append(f"{'':20} {spec.summary}")
    return "\n".join(lines)
