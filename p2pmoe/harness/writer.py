"""What a benchmark leaves: <name>.json, <name>.md and its figures, and the command that
makes them again.

Every report reads the same way: a title, the setting in words, the rerun command, then the
script's own tables and findings. The rerun command is the script's flags as given (a path
of this machine as a placeholder), so a reader can paste it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.harness.flags import seed_list
from p2pmoe.report.tables import columns_of, format_table
from p2pmoe.report.tables import rerun_command as flags_as_given

Figure = Callable[[Path, str], object]
"""Draws a figure into a folder under a file name (the report's figure functions' shape)."""


def rerun_command(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: tuple[str, ...] = (), **fixed: Any) -> str:
    """`python bench/<script> <flags>` with the values `args` holds, but for the dests in
    `skip` and with `fixed` values in place of the given ones: a flag a rerun must have
    whatever this invocation had (checkpoints a report needs, say). The script is the
    parser's program name, so a script need not spell its own path."""
    given = argparse.Namespace(**{**vars(args), **fixed})
    return flags_as_given(f"bench/{parser.prog}", given, skip=skip, parser=parser)


def markdown(title: str, setting: str, command: str, *sections: str) -> str:
    """The report: title, setting, the rerun command, then `sections` one after the other."""
    return f"# {title}\n\n{setting}\n\nCommand: `{command}`\n\n" + "\n".join(sections)


def write_results(folder: Path, name: str, data: Any, text: str, figures: Mapping[str, Figure] | None = None, echo: bool = True) -> None:
    """`folder/<name>.json` holding `data`, `folder/<name>.md` holding `text` and each of
    `figures` drawn as `folder/<file name>`, each written whole or not at all; `text` is
    printed too unless `echo` is off (a script writing after every run prints its own line)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, draw in (figures or {}).items():
        draw(folder, file_name)
    atomic_write_json(folder / f"{name}.json", data)
    atomic_write_bytes(folder / f"{name}.md", text.encode())
    if echo:
        print(text, flush=True)


RUN_ONLY_FLAGS = ("threads", "jobs", "name", "results", "checkpoint_every", "report_only")
"""Flags that change how a benchmark runs or where it writes, not what it measures: the rerun
command leaves them out, but for a `--name` other than the script's default: the name also
picks the run folders, so a rerun without it would read, and overwrite, the default's."""


def write_seed_tables(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    title: str,
    doc: str | None,
    tables: Mapping[str, list[dict[str, Any]]],
    figures: Mapping[str, Figure] | None = None,
    findings: Sequence[str] = (),
    rows: Sequence[dict[str, Any]] = (),
) -> None:
    """The report of a comparison over seeds: the setting (the script's docstring after its
    first paragraph), the rerun command, one table per heading of `tables` (headings with no
    rows left out) and the script's `findings` as a list, written with `figures` as
    <name>.json, .md and PNGs; the JSON also keeps `rows`, one `result_row` per run (per-node
    and per-domain metrics a table leaves out; run folders do not always outlive a session)."""
    sections = [f"## {heading}\n\n```\n{format_table(table, columns_of(table))}\n```\n" for heading, table in tables.items() if table]
    sections += ["".join(f"- {line}\n" for line in findings)] if findings else []
    own_name = getattr(args, "name", None) not in (None, parser.get_default("name"))
    command = rerun_command(parser, args, skip=tuple(flag for flag in RUN_ONLY_FLAGS if hasattr(args, flag) and not (flag == "name" and own_name)))
    paragraphs = (doc or "").split("\n\n", 1)
    text = markdown(title, paragraphs[-1].strip(), command, *sections)
    write_results(args.results, args.name, {"seeds": seed_list(args), "tables": dict(tables), "findings": list(findings), "rows": list(rows)}, text, figures)
