"""Experiment trackers: each stage's metrics, the evaluation figures and report.md, where researchers look.

``training.report_to`` names any of ``tensorboard``, ``wandb``, ``mlflow`` (none by default). Runs
are grouped by run directory: one TensorBoard folder per stage under it, one W&B run per stage in
the group named after it, one MLflow run per stage in the experiment named after it. Nothing here
needs a network: W&B follows ``WANDB_MODE`` (``offline`` writes files to sync later), MLflow
``MLFLOW_TRACKING_URI`` (default: a file store in RUN/mlruns, which MLflow 3 keeps behind
``MLFLOW_ALLOW_FILE_STORE``; set a server or database URI for more). Only rank 0 reports.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Sequence

# name -> (module that must import, the pip extra that brings it)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


def missing(names: Sequence[str]) -> Optional[str]:
    """Why a named tracker cannot run here (not installed), or None; checked without importing it."""
    for name in names:
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            return f"{name} is not installed; pip install 'sande-dist[{extra}]' (or leave it out of training.report_to)"
    return None


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested figures flattened to "a/b/c" -> number (bools and None left out)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class Tracker:
    """The trackers ``report_to`` names, for one stage of one run directory (rank 0 only)."""

    def __init__(self, report_to: Sequence[str], run_dir: str | Path, stage: str, config: Optional[dict] = None):
        self.run_dir, self.stage = Path(run_dir).resolve(), stage
        self.tb = self.wandb = self.mlflow = None
        group = self.run_dir.name
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / stage / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "sande-dist"), group=group, name=stage,
                                    dir=str(self.run_dir / stage), config=config or {}, reinit="finish_previous")
        if "mlflow" in report_to:
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri or uri.startswith("file:"):
                # MLflow keeps its file store (offline, no database) behind this switch since 3.x.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri or (self.run_dir / "mlruns").as_uri())
            mlflow.set_experiment(group)
            self.mlflow = mlflow
            mlflow.start_run(run_name=stage)
            if config:
                mlflow.log_dict(config, "config.json")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = _numbers(metrics)
        numbers.pop("step", None)
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"{self.stage}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in numbers.items()}, step=step)

    def summary(self, figures: dict[str, Any]) -> None:
        """Final figures (an evaluation's report)."""
        numbers = _numbers(figures)
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"{self.stage}/{key}", value, 0)
        if self.wandb is not None:
            self.wandb.summary.update(numbers)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in numbers.items()})

    def artifact(self, path: str | Path) -> None:
        path = Path(path)
        if self.tb is not None and path.suffix == ".md":
            self.tb.add_text(f"{self.stage}/{path.name}", path.read_text())
        if self.wandb is not None:
            self.wandb.save(str(path), base_path=str(path.parent), policy="now")
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
