"""Typed, self-describing options: one declaration gives the TOML keys, the CLI flags, `--help`
and the docs' option tables.

An options class is a frozen dataclass deriving from `Options` whose fields are declared with
`option(default, help, ...)`. Values are checked when the object is built, so a config that
exists is a valid config. This module imports nothing heavy (no torch): the command line reads
it before it knows whether a command needs torch at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

_SCALARS = (bool, int, float, str)


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """A dataclass field with its help line and constraints: `minimum`/`maximum` are inclusive
    bounds, `above` an exclusive lower bound, `choices` the allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum, "maximum": maximum, "above": above}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """What a user sees of one option: its key, type, default, constraints and meaning."""

    name: str
    kind: type
    optional: bool
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    minimum: float | None
    maximum: float | None
    above: float | None

    @property
    def type_text(self) -> str:
        text = self.kind.__name__
        return f"{text} or none" if self.optional else text

    @property
    def constraint_text(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(str(c) for c in self.choices))
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return "; ".join(parts)


def _kind_of(annotation: Any) -> tuple[type, bool]:
    """(scalar type, whether None is allowed) of a field annotation such as `int | None`."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1 or kinds[0] not in _SCALARS:
            raise TypeError(f"unsupported option type {annotation!r}")
        return kinds[0], True
    if annotation not in _SCALARS:
        raise TypeError(f"unsupported option type {annotation!r}")
    return annotation, False


class Options:
    """Base of every options dataclass (`@dataclass(frozen=True) class X(Options)`).

    `section` names the table in TOML files ([run], [task] or [method]) for error messages.
    """

    section: ClassVar[str] = "options"

    def __post_init__(self) -> None:
        for info in describe(type(self)):
            check_value(info, getattr(self, info.name), f"[{self.section}] {info.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


T = TypeVar("T", bound=Options)


def options_as(value: Options, cls: type[T], needed_by: str) -> T:
    """`value` as options of `cls`: the one checked narrowing of a config's `[task]` or
    `[method]` table to the type a family or method declares (no asserts scattered about)."""
    if not isinstance(value, cls):
        raise TypeError(f"{needed_by} needs [{cls.section}] options of type {cls.__name__}, got {type(value).__name__}")
    return value


def describe(cls: type) -> list[OptionInfo]:
    """The options of `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind_of(hints[f.name])
        meta = f.metadata
        out.append(
            OptionInfo(
                f.name, kind, optional, f.default, meta.get("help", ""), meta.get("choices"), meta.get("minimum"), meta.get("maximum"), meta.get("above")
            )
        )
    return out


def check_value(info: OptionInfo, value: Any, where: str) -> None:
    """Raise ValueError naming `where` if `value` is not a valid value of the option."""
    if value is None:
        if not info.optional:
            raise ValueError(f"{where} must be a {info.type_text}, got none")
        return
    ok_type = isinstance(value, info.kind) and not (info.kind is not bool and isinstance(value, bool))
    if info.kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok_type = True
    if not ok_type:
        raise ValueError(f"{where} must be a {info.type_text}, got {value!r}")
    if info.choices is not None and value not in info.choices:
        raise ValueError(f"{where} must be one of {list(info.choices)}, got {value!r}")
    if info.minimum is not None and value < info.minimum:
        raise ValueError(f"{where} must be >= {info.minimum:g}, got {value!r}")
    if info.above is not None and value <= info.above:
        raise ValueError(f"{where} must be > {info.above:g}, got {value!r}")
    if info.maximum is not None and value > info.maximum:
        raise ValueError(f"{where} must be <= {info.maximum:g}, got {value!r}")


def parse_text(info: OptionInfo, text: str, where: str) -> Any:
    """A command-line string as the option's type ("none" for an optional option's None)."""
    if info.optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if info.kind is bool:
            if text.lower() in ("true", "yes", "1", "on"):
                return True
            if text.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if info.kind is int:
            return int(text)
        if info.kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{where} must be a {info.type_text}, got {text!r}") from None
    return text


def from_mapping(cls: type, values: Mapping[str, Any], source: str, base: Mapping[str, Any] | None = None) -> Any:
    """Build `cls` from TOML values (exact types: `rounds = "20"` is an error, not 20) on top of
    `base`; unknown keys are an error that lists the valid ones (a typo is never ignored)."""
    infos = {info.name: info for info in describe(cls)}
    unknown = sorted(set(values) - set(infos))
    section = getattr(cls, "section", "options")
    if unknown:
        raise ValueError(f"{source}: [{section}] has unknown keys {unknown}; valid keys: {sorted(infos)}")
    merged = dict(base or {})
    for name, value in values.items():
        check_value(infos[name], value, f"{source}: [{section}] {name}")
        merged[name] = float(value) if infos[name].kind is float and value is not None else value
    return cls(**merged)


def flag(name: str, prefix: str = "") -> str:
    """The command-line flag of option `name` (`embed_dim` -> `--embed-dim`, with an optional prefix)."""
    return "--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str, prefix: str = "", defaults: Mapping[str, Any] | None = None, skip: Collection[str] = ()
) -> None:
    """One flag per option (but those in `skip`: a variant's pinned ones), parsed as text
    (converted later, so errors name the option); `--help` shows type, constraints, default
    and meaning. `dest` is `<section>.<name>`."""
    group = parser.add_argument_group(title)
    section = getattr(cls, "section", "options")
    for info in (i for i in describe(cls) if i.name not in skip):
        default = (defaults or {}).get(info.name, info.default)
        details = ", ".join(x for x in (info.type_text, info.constraint_text, f"default {default}") if x)
        group.add_argument(
            flag(info.name, prefix), dest=f"{section}.{info.name}", default=None, metavar=info.kind.__name__.upper(), help=f"{info.help} ({details})"
        )


def values_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of `cls` given on the command line, converted to their types."""
    section = getattr(cls, "section", "options")
    out = {}
    for info in describe(cls):
        text = getattr(args, f"{section}.{info.name}", None)
        if text is not None:
            out[info.name] = parse_text(info, text, f"{flag(info.name)}")
    return out


def markdown_table(cls: type, prefix: str = "", skip: Collection[str] = ()) -> str:
    """The docs' table of `cls` (less `skip`): TOML key, flag, type and constraints, default, meaning."""
    lines = ["| key | flag | type | default | meaning |", "|---|---|---|---|---|"]
    for info in (i for i in describe(cls) if i.name not in skip):
        kind = ", ".join(x for x in (info.type_text, info.constraint_text) if x)
        lines.append(f"| `{info.name}` | `{flag(info.name, prefix)}` | {kind} | `{info.default}` | {info.help} |")
    return "\n".join(lines)
