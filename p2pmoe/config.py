"""Where an experiment's values come from: defaults < a command's own defaults < a TOML file <
command-line flags.

A TOML file has up to three tables: `[run]` (the common options of `RunOptions`), `[task]`
(the options of the task family its data belongs to) and `[method]` (the options the method
declares). Flags are the same keys with dashes; a method's flags carry its prefix
(`--fedmoe-p`). Which task and method tables apply is known only once `method` and `data` are,
so the command line is read in two passes (see `experiment_parser`).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pmoe.methods.registry import MethodSpec, get_method, methods_for
from p2pmoe.options import OptionInfo, add_arguments, describe, from_mapping, values_from_args
from p2pmoe.plugins import load_plugins
from p2pmoe.settings import ExperimentConfig, RunOptions
from p2pmoe.tasks.base import Task, all_tasks, task_for_data

SECTIONS = ("run", "task", "method")
Values = dict[str, dict[str, Any]]


def empty_values() -> Values:
    return {section: {} for section in SECTIONS}


def read_toml(path: str | Path) -> Values:
    """The `[run]`, `[task]` and `[method]` tables of a config file (any other key is an error)."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read config: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    return tables_of(raw, str(path))


def tables_of(raw: Mapping[str, Any], source: str) -> Values:
    """Split parsed TOML into the three experiment tables; stray keys are named."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown keys or tables {unknown}; an experiment has tables {['[' + s + ']' for s in SECTIONS]}")
    values = empty_values()
    for section in SECTIONS:
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [{section}] must be a table")
        values[section] = dict(table)
    return values


def merge(*layers: Values) -> Values:
    """Later layers win, key by key."""
    out = empty_values()
    for layer in layers:
        for section in SECTIONS:
            out[section].update(layer.get(section, {}))
    return out


def build_config(values: Values, source: str = "config") -> ExperimentConfig:
    """Typed, checked config from layered values: unknown keys, wrong types and out-of-range
    values are errors naming the key and `source`."""
    run = from_mapping(RunOptions, values["run"], source)
    load_plugins(run.plugins)  # before the method and the data are looked up: they may be a plugin's
    task = task_for_data(run.data)
    spec = get_method(run.method, task.name)
    return ExperimentConfig(run, from_mapping(task.options, values["task"], source), spec.method_options(values["method"], source))


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """Settle what the task family decides (learning rate default, one client per domain)."""
    return task_for_data(cfg.run.data).resolve(cfg)


def spec_of(cfg: ExperimentConfig) -> tuple[Task[Any], MethodSpec[Any]]:
    task = task_for_data(cfg.run.data)
    return task, get_method(cfg.run.method, task.name)


def default_config(**run: Any) -> ExperimentConfig:
    """Defaults everywhere but the given `[run]` keys (tests and benchmarks start here)."""
    return build_config(merge(empty_values(), {"run": run}))


def with_options(
    cfg: ExperimentConfig, task_options: Mapping[str, Any] | None = None, method_options: Mapping[str, Any] | None = None, **run: Any
) -> ExperimentConfig:
    """`cfg` with some `[run]` keys and some task and method options changed; after a change
    of method (or of task family) the new table keeps the values of the keys it also declares
    (FedMoE-DA's P and tau carry over to its server-assisted variant) and defaults the rest."""
    pinned = get_method(cfg.run.method).pinned  # a variant's fixed values are not the user's: they do not carry over
    method = {k: v for k, v in cfg.method.to_dict().items() if k not in pinned}
    values = merge({"run": cfg.run.to_dict(), "task": cfg.task.to_dict(), "method": method}, {"run": run})
    task = task_for_data(values["run"]["data"])
    spec = get_method(values["run"]["method"], task.name)
    values["task"] = _declared(values["task"], describe(task.options))
    values["method"] = _declared(values["method"], spec.own_options())
    return build_config(merge(values, {"task": dict(task_options or {}), "method": dict(method_options or {})}))


def _declared(values: Mapping[str, Any], infos: Sequence[OptionInfo]) -> dict[str, Any]:
    names = {info.name for info in infos}
    return {k: v for k, v in values.items() if k in names}


# -- the command line ---------------------------------------------------------------------------


def _first_pass(argv: Sequence[str], defaults: Values) -> tuple[str, str]:
    """The method and data the full parser is built for: flags, else the --config file, else defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    pre.add_argument("--method")
    pre.add_argument("--data")
    pre.add_argument("--plugins")
    known, _ = pre.parse_known_args(argv)
    from_file = read_toml(known.config)["run"] if known.config else {}
    load_plugins(known.plugins or from_file.get("plugins") or defaults["run"].get("plugins"))
    method = known.method or from_file.get("method") or defaults["run"].get("method") or RunOptions.method
    data = known.data or from_file.get("data") or defaults["run"].get("data") or RunOptions.data
    return str(method), str(data)


def add_experiment_arguments(parser: argparse.ArgumentParser, argv: Sequence[str], defaults: Values | None = None) -> None:
    """--config FILE and one flag per option of `[run]`, of the data's task family and of the
    method (as given in `argv` or the file); `--help` shows the defaults this command uses."""
    defaults = defaults or empty_values()
    method, data = _first_pass(argv, defaults)
    parser.add_argument("--config", type=Path, help="TOML file with [run], [task] and [method] tables; flags win over it")
    add_arguments(parser, RunOptions, "run options ([run])", defaults=defaults["run"])
    try:
        task = task_for_data(data)
    except ValueError as exc:
        parser.epilog = f"error: {exc}"
        return
    add_arguments(parser, task.options, f"{task.name} task options ([task])", defaults=defaults["task"])
    fitting = f"methods that run on {data} ({task.name} data): {', '.join(methods_for(task.name))}"
    try:
        spec = get_method(method, task.name)
    except ValueError:
        parser.epilog = f"{fitting}. Method {method!r} does not run on it: pass --method NAME (with --help for that method's options)."
        return
    add_arguments(parser, spec.options, f"{spec.name} options ([method])", prefix=spec.flag_prefix, defaults=defaults["method"], skip=spec.pinned)
    data_sets = ", ".join(f"{d} ({t.name})" for t in all_tasks().values() for d in t.data)
    parser.epilog = f"{fitting}. Every data set: {data_sets}. Other methods' options: --method NAME --help."


def config_from_args(args: argparse.Namespace, defaults: Values | None = None) -> ExperimentConfig:
    """Defaults, then the command's own defaults, then the --config file, then explicit flags."""
    layers = [defaults or empty_values()]
    if getattr(args, "config", None):
        layers.append(read_toml(args.config))
    flags = empty_values()
    flags["run"] = values_from_args(args, RunOptions)
    base = merge(*layers, flags)
    run = from_mapping(RunOptions, base["run"], "command line")
    task = task_for_data(run.data)
    spec = get_method(run.method, task.name)
    flags["task"] = values_from_args(args, task.options)
    flags["method"] = values_from_args(args, spec.options)
    return build_config(merge(*layers, flags), str(getattr(args, "config", None) or "command line"))
