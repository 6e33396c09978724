"""Experiment tracking: the per-round row that goes to ``metrics.jsonl`` also goes to the trackers a run
names in ``report_to`` and to the ``callbacks`` of ``fedslip.run``.

    fedslip run --method fedslip --report-to tensorboard,csv --out runs/x
    tensorboard --logdir runs/x/tensorboard

    summary = fedslip.run(cfg, "runs/x", callbacks=[lambda row: print(row["round"], row["global_accuracy"])])

Trackers receive the scalar values of each row (accuracies, losses, bytes, seconds; per-client lists as
``<key>/client<i>``) with the round as step, and the summary's scalars at the end. The tracking libraries
are optional extras (``pip install 'fedslip[tensorboard]'``, ``'fedslip[mlflow]'``, or wandb), imported
only when a run asks for them; a missing one is refused before the run starts.

| tracker | where |
|---|---|
| ``csv`` | ``<run>/metrics.csv`` (one line per round; rewritten from the checkpoint on resume) |
| ``tensorboard`` | ``<run>/tensorboard/`` (``torch.utils.tensorboard``) |
| ``mlflow`` | ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<run>/mlflow.db``; a run each, config as params |
| ``wandb`` | project ``WANDB_PROJECT`` (default ``fedslip``), files under ``<run>/wandb`` |
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .config import ConfigError, ExperimentConfig
from .storage import atomic_write_bytes

Callback = Callable[[dict], Any]
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "csv": None}  # config.TRACKERS
EXTRAS = {"tensorboard": "pip install 'fedslip[tensorboard]'", "mlflow": "pip install 'fedslip[mlflow]'",
          "wandb": "pip install wandb"}


def scalars(row: dict) -> dict[str, float]:
    """The numeric values of a row: numbers as they are, lists of numbers per client (``key/client<i>``),
    dicts keyed by client id likewise; None, strings and nested structures are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, int | float):  # bools too (1.0 / 0.0)
            out[key] = float(value)
        elif isinstance(value, list) and key.endswith("per_client"):
            out.update({f"{key}/client{i}": float(v) for i, v in enumerate(value) if isinstance(v, int | float)})
        elif isinstance(value, dict) and key in ("private_sparsity",):
            out.update({f"{key}/client{c}": float(v) for c, v in value.items() if isinstance(v, int | float)})
    return out


def check_available(cfg: ExperimentConfig) -> None:
    """Refuse, before anything runs, a tracker whose library is not installed."""
    for name in cfg.report_to:
        module = MODULES[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to includes {name!r} but {module} is not installed: {EXTRAS[name]}")


class CsvTracker:
    """``metrics.csv``: the scalar columns of the first row, one line per round."""

    def __init__(self, run_path: Path, history: list[dict]):
        self.path = run_path / "metrics.csv"
        self.rows = [scalars(r) for r in history]
        self._write()

    def _write(self) -> None:
        columns = list(self.rows[0]) if self.rows else []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, buffer.getvalue().encode() if columns else b"")

    def log_round(self, row: dict) -> None:
        self.rows.append(scalars(row))
        self._write()

    def log_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, run_path: Path, cfg: ExperimentConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in cfg.to_dict().items()))

    def log_round(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["round"])
        self.writer.flush()

    def log_summary(self, summary: dict) -> None:
        for key, value in scalars(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, global_step=summary["rounds"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, run_path: Path, cfg: ExperimentConfig):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(run_path / 'mlflow.db').resolve()}")  # MLflow 3: no file store
        self.run = mlflow.start_run(run_name=run_path.name)
        mlflow.log_params({k: ",".join(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()})

    def log_round(self, row: dict) -> None:
        self.mlflow.log_metrics(_metric_names(scalars(row)), step=row["round"])

    def log_summary(self, summary: dict) -> None:
        self.mlflow.log_metrics(_metric_names({f"summary/{k}": v for k, v in scalars(summary).items()}),
                                step=summary["rounds"])

    def close(self) -> None:
        self.mlflow.end_run()


def _metric_names(values: dict[str, float]) -> dict[str, float]:
    """MLflow metric names allow letters, digits, ``_ - . / space``: the rest becomes ``_``."""
    return {"".join(c if c.isalnum() or c in "_-./ " else "_" for c in k): v for k, v in values.items()}


class WandbTracker:
    def __init__(self, run_path: Path, cfg: ExperimentConfig):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedslip"), name=run_path.name,
                              dir=str(run_path), config=cfg.to_dict())

    def log_round(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["round"])

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update(scalars(summary))

    def close(self) -> None:
        self.run.finish()


class CallbackTracker:
    """The user's callables, each called with every round's row (a copy: a callback cannot change it)."""

    def __init__(self, callbacks: Iterable[Callback]):
        self.callbacks = list(callbacks)

    def log_round(self, row: dict) -> None:
        for callback in self.callbacks:
            callback(dict(row))

    def log_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Trackers:
    """Every tracker of a run, fed from the round loop (``rounds._rounds``)."""

    def __init__(self, cfg: ExperimentConfig, run_path: Path, history: list[dict],
                 callbacks: Iterable[Callback] = ()):
        check_available(cfg)
        makers = {"csv": lambda: CsvTracker(run_path, history),
                  "tensorboard": lambda: TensorBoardTracker(run_path, cfg),
                  "mlflow": lambda: MlflowTracker(run_path, cfg), "wandb": lambda: WandbTracker(run_path, cfg)}
        self.trackers: list[Any] = []
        try:
            for name in cfg.report_to:
                self.trackers.append(makers[name]())
        except BaseException:  # the ones already open are closed, not left running
            self.close()
            raise
        self.trackers.append(CallbackTracker(callbacks))

    def log_round(self, row: dict) -> None:
        for tracker in self.trackers:
            tracker.log_round(row)

    def log_summary(self, summary: dict) -> None:
        for tracker in self.trackers:
            tracker.log_summary(summary)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
