"""Run metrics in the trackers people already watch: TensorBoard (`--tensorboard DIR`) and
MLflow (`--mlflow URI`), beside the run folder's metrics.jsonl.

Each metrics line (one node, one round) becomes scalars at step = round, named
`<group>/<name>/<node>` (group `metrics`, `train` or `bytes`), so TensorBoard draws one card
per metric with a line per node. Both are optional extras (`pip install 'p2pmoe[track]'`);
asking for one that is not installed is an error before the run starts, never a crash later.
A tracker only reads rows: the run folder stays the record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one metrics line, named `<group>/<name>/<node>`."""
    node = row.get("node", "?")
    out: dict[str, float] = {}
    for group in ("metrics", "train"):
        for name, value in (row.get(group) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{group}/{name}/{node}"] = float(value)
    for key in ("bytes_sent", "bytes_received"):
        if isinstance(row.get(key), int | float):
            out[f"bytes/{key.removeprefix('bytes_')}/{node}"] = float(row[key])
    return out


def _missing(extra: str, exc: ImportError) -> ValueError:
    return ValueError(f"{extra} output needs its package ({exc.name} is not installed): pip install 'p2pmoe[track]'")


class TensorBoardTracker:
    """Event files under `folder` (torch's SummaryWriter); several nodes may share one folder."""

    def __init__(self, folder: str | Path, run_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("--tensorboard", exc) from None
        self._writer = SummaryWriter(log_dir=str(Path(folder) / run_name))

    def log(self, row: Mapping[str, Any]) -> None:
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, global_step=int(row.get("round", 0)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


_MLFLOW_UNSAFE = re.compile(r"[^\w\-. /:]")  # MLflow keys: alphanumerics, _ - . space / :


class MlflowTracker:
    """One MLflow run at `uri` (a tracking server or a local `file:` store) with the run's
    setting as parameters."""

    def __init__(self, uri: str, run_name: str, params: Mapping[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise _missing("--mlflow", exc) from None
        self._mlflow = mlflow
        try:
            mlflow.set_tracking_uri(uri)
            self._run = mlflow.start_run(run_name=run_name)
            mlflow.log_params({_MLFLOW_UNSAFE.sub("_", k): str(v)[:500] for k, v in params.items()})
        except Exception as exc:  # an unreachable server or a refused store: said before the run starts
            raise ValueError(f"--mlflow {uri}: {str(exc).splitlines()[0]}") from None

    def log(self, row: Mapping[str, Any]) -> None:
        values = {_MLFLOW_UNSAFE.sub("_", name): value for name, value in scalars(row).items()}
        if values:
            self._mlflow.log_metrics(values, step=int(row.get("round", 0)), run_id=self._run.info.run_id)

    def close(self) -> None:
        self._mlflow.end_run()


def open_trackers(tensorboard: str | None, mlflow: str | None, run_name: str, setting: Mapping[str, Mapping[str, Any]]) -> list[Tracker]:
    """The trackers a run asked for (none by default)."""
    trackers: list[Tracker] = []
    if tensorboard:
        trackers.append(TensorBoardTracker(tensorboard, run_name))
    if mlflow:
        params = {f"{section}.{key}": value for section, table in setting.items() for key, value in table.items()}
        trackers.append(MlflowTracker(mlflow, run_name, params))
    return trackers
