"""The ``tracking`` section: the experiment trackers a job's metrics also go to.

Each tracker is its library's own client, an optional extra of kdray (``pip install
'kdray[tensorboard]'``, ``'kdray[mlflow]'``, ``'kdray[wandb]'``); a spec naming one whose library
the driver's environment lacks fails validation, naming the install. What is logged, and how a
resumed job continues its runs: :mod:`kdray.report.trackers`.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from kdray.spec.base import _Spec

#: tracker -> (the module its client needs, the extra that installs it)
LIBRARIES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
             "wandb": ("wandb", "wandb")}


class TensorBoardSpec(_Spec):
    """TensorBoard event files, written with ``torch.utils.tensorboard``."""

    log_dir: str | None = Field(
        None, description="Directory of the job's event files (null: OUTPUT_DIR/tensorboard). A "
        "resumed job appends to it; view with `tensorboard --logdir DIR`.")


class MlflowSpec(_Spec):
    """An MLflow run, logged with ``mlflow.MlflowClient``."""

    tracking_uri: str = Field(
        min_length=1, description="The MLflow tracking server or store, e.g. http://mlflow:5000 "
        "(a server's artifact proxy receives report.md and the plots).")
    experiment: str | None = Field(
        None, min_length=1, description="Experiment name, created when missing (null: the job's name).")
    run_name: str | None = Field(None, min_length=1, description="The run's name (null: the job's name).")


class WandbSpec(_Spec):
    """A Weights & Biases run, logged with ``wandb``."""

    project: str = Field(min_length=1, description="W&B project.")
    entity: str | None = Field(None, min_length=1, description="W&B entity (team or user; null: the login's default).")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: stream to the W&B server (needs `wandb login` or WANDB_API_KEY); "
        "offline: write the run under OUTPUT_DIR/wandb/ for `wandb sync` later. W&B cannot resume "
        "an offline run: a resumed job writes a new directory with the same run id holding the "
        "whole history; sync the newest.")
    run_name: str | None = Field(None, min_length=1, description="The run's display name (null: the job's name).")


class TrackingSpec(_Spec):
    """Experiment trackers that receive every step's metrics, the evaluations, the resolved spec
    and the report (none by default; any combination)."""

    tensorboard: TensorBoardSpec | None = Field(None, description="TensorBoard event files (null: off).")
    mlflow: MlflowSpec | None = Field(None, description="An MLflow run (null: off).")
    wandb: WandbSpec | None = Field(None, description="A W&B run (null: off).")

    @model_validator(mode="after")
    def _libraries_installed(self) -> "TrackingSpec":
        missing = [f"{name} needs the {module} package: pip install 'kdray[{extra}]'"
                   for name, (module, extra) in LIBRARIES.items()
                   if getattr(self, name) is not None and importlib.util.find_spec(module) is None]
        if missing:
            raise ValueError("; ".join(missing))
        return self

    @property
    def enabled(self) -> list[str]:
        """The trackers turned on, in a fixed order."""
        return [name for name in LIBRARIES if getattr(self, name) is not None]
