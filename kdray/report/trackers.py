"""Experiment trackers: a job's metrics in TensorBoard, MLflow and W&B, through their own clients.

:class:`Trackers` is a sink of the job's :class:`~kdray.pipeline.progress.Reporter` (it sees
every event that goes to ``events.jsonl``) and sends to each tracker the spec turned on
(``tracking:``, :mod:`kdray.spec.tracking`):

* every ``train_step`` event's numbers as ``train/<key>`` at its optimizer step: the loss and
  its parts, the schedule values (lr, kd_temperature, α, β, stage, round), throughput and the
  step's time parts (the names are those of a job's ``train_metrics.jsonl``);
* every ``evaluation`` event (a round's student, then teacher, student_before, student_after)
  as ``eval/<model>/<score>`` at the last step trained;
* the resolved spec, at the start: MLflow params and W&B config (flattened to dotted keys),
  TensorBoard text (the YAML);
* report.md and the plots, at the end: MLflow artifacts under ``report/``, W&B run files,
  TensorBoard text and images; then the run's status (finished, failed, killed).

Resuming. ``OUTPUT_DIR/state/trackers.json`` holds each run's id and the last step sent to
every tracker. A resumed job reopens the same runs (the MLflow run id; the W&B id with
``resume="allow"``; the same TensorBoard directory), sends the kept history's steps after that
one, and goes on. W&B cannot resume an offline run, and a killed process loses what its
``wandb-core`` had not yet written: a resumed offline run is a new directory with the same id
that gets the whole kept history, so the newest directory holds the whole job. Steps trained again after a restore from a checkpoint are sent again:
TensorBoard purges the later events (``purge_step``, so the directory reads as one history),
MLflow keeps both values at the step (the later one is current), W&B plots against
``train/step``. A tracker that fails while the job runs is reported once and the job goes on
(its metrics stay in ``events.jsonl``); one that cannot start fails the job before any stage.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from kdray.errors import ConfigError

#: ``train_step`` fields that are not per-step numbers to plot.
_NOT_METRICS = {"time", "kind", "step", "checkpoint", "final"}


#: What to check when a tracker does not start.
_CHECK = {"tensorboard": "log_dir must be a writable directory",
          "mlflow": "tracking_uri must reach a running MLflow server",
          "wandb": "online runs need `wandb login` or WANDB_API_KEY; or use mode: offline"}


def _numbers(fields: dict[str, Any], skip: set[str] = _NOT_METRICS) -> dict[str, float]:
    return {k: float(v) for k, v in fields.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A spec dump as ``{"training.lr": "0.003", ...}`` (lists as JSON)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value if isinstance(value, str) else json.dumps(value)}


class _TensorBoard:
    name = "tensorboard"
    resend_all = False  # a resumed run also gets the history it already has

    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self._open = lambda purge: SummaryWriter(str(log_dir), purge_step=purge)
        self.writer = self._open(purge_step)
        self.run_id = str(log_dir)

    def start(self, spec_yaml: str, flat: dict[str, str], resumed: bool) -> None:
        if not resumed:
            self.writer.add_text("spec", f"```yaml\n{spec_yaml}\n```", 0)

    def metrics(self, values: dict[str, float], step: int, redo: bool) -> None:
        if redo:  # a restored worker group trains these steps again: drop the old events from here
            self.writer.close()
            self.writer = self._open(step)
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # on disk before the step counts as sent

    def report(self, report_md: Path | None, plots: list[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        if report_md is not None:
            self.writer.add_text("report", report_md.read_text(encoding="utf-8"), step)
        for png in plots:
            with Image.open(png) as image:
                self.writer.add_image(f"report/{png.stem}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()


class _Mlflow:
    name = "mlflow"
    resend_all = False

    def __init__(self, cfg: Any, job_name: str, run_id: str | None, message: Callable[[str], None]):
        from mlflow import MlflowClient

        _reachable(cfg.tracking_uri)
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        experiment = cfg.experiment or job_name
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception as exc:  # noqa: BLE001 - MlflowException: not on this server
                message(f"tracking: MLflow run {run_id} is not at {cfg.tracking_uri} ({exc}); starting a new run")
                run_id = None
        self.resumed = run_id is not None
        self.run_id = run_id or self.client.create_run(experiment_id, run_name=cfg.run_name or job_name,
                                                       tags={"kdray.job": job_name}).info.run_id

    def start(self, spec_yaml: str, flat: dict[str, str], resumed: bool) -> None:
        from mlflow.entities import Param

        if self.resumed:  # params are write-once; the run has them
            return
        params = [Param(k, v if len(v) <= 6000 else v[:5999] + "…") for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def metrics(self, values: dict[str, float], step: int, redo: bool) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def report(self, report_md: Path | None, plots: list[Path], step: int) -> None:
        for path in ([report_md] if report_md is not None else []) + plots:
            self.client.log_artifact(self.run_id, str(path), artifact_path="report")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _Wandb:
    name = "wandb"

    def __init__(self, cfg: Any, job_name: str, out: Path, run_id: str | None, config: dict[str, Any]):
        import wandb

        self.resumed = run_id is not None
        self.resend_all = self.resumed and cfg.mode == "offline"  # a new directory: see the module
        self.run_id = run_id or uuid.uuid4().hex[:12]
        # W&B resumes only online runs (offline: a second directory with this id, for `wandb sync --append`).
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(out), id=self.run_id,
                              name=cfg.run_name or job_name, config=config, reinit="create_new",
                              resume="allow" if cfg.mode == "online" and self.resumed else None,
                              settings=wandb.Settings(console="off", x_disable_stats=True, quiet=True))
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("eval/*", step_metric="train/step")

    def start(self, spec_yaml: str, flat: dict[str, str], resumed: bool) -> None:
        pass  # the spec went in as the run's config

    def metrics(self, values: dict[str, float], step: int, redo: bool) -> None:
        self.run.log({"train/step": step, **values})

    def report(self, report_md: Path | None, plots: list[Path], step: int) -> None:
        import shutil

        # Copied into the run's own directory first: W&B would otherwise symlink the job's files
        # (a later run of the job would change what this run shows) and warn about each.
        target = Path(self.run.dir) / "report"
        target.mkdir(parents=True, exist_ok=True)
        for path in ([report_md] if report_md is not None else []) + plots:
            copy = target / path.name
            shutil.copyfile(path, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Trackers:
    """The trackers of one run of a job; call it with every reporter event.

    Args:
        spec: the job's spec (its ``tracking`` section says which trackers).
        out: the job's output directory (state, default TensorBoard and W&B directories).
        resumed: whether this run resumes an earlier one (which reopens its tracker runs).
        history: the kept per-step metrics of the earlier run, in step order (the steps of
            ``train_metrics.jsonl``: :class:`kdray.report.train_metrics.StepLog`).
        message: where a tracker's failure during the job is reported (once per tracker).

    Raises:
        ConfigError: a tracker does not start (its server unreachable, W&B not logged in),
            naming the tracker and its setting.
    """

    def __init__(self, spec: Any, out: Path, resumed: bool, history: Iterable[dict[str, Any]],
                 message: Callable[[str], None]):
        from kdray.spec import dump_spec

        self.path = out / "state" / "trackers.json"
        saved = _read_json(self.path) if resumed else {}
        self.last_step = int(saved.get("last_step", 0))
        runs = saved.get("runs", {})
        self.message = message
        self.failed: set[str] = set()
        self.trackers: list[Any] = []
        cfg, dump = spec.tracking, spec.model_dump(mode="json")
        for name in cfg.enabled:
            try:
                if name == "tensorboard":
                    log_dir = Path(cfg.tensorboard.log_dir).expanduser() if cfg.tensorboard.log_dir else out / "tensorboard"
                    # from the step after the last sent: the directory holds this job's one history
                    tracker: Any = _TensorBoard(log_dir, self.last_step + 1)
                elif name == "mlflow":
                    tracker = _Mlflow(cfg.mlflow, spec.name, runs.get("mlflow"), message)
                else:
                    tracker = _Wandb(cfg.wandb, spec.name, out, runs.get("wandb"), dump)
                tracker.start(dump_spec(spec), _flatten(dump), bool(saved))
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - each library's own errors
                self.finish("FAILED")
                raise ConfigError(f"tracking.{name} did not start: {type(exc).__name__}: {exc}; check "
                                  f"tracking.{name} in the spec ({_CHECK[name]}), or remove it") from None
            self.trackers.append(tracker)
        self._save()
        for metrics in history:  # what the earlier run recorded but did not send to every tracker
            step = metrics.get("step", 0)
            if step > self.last_step:
                self._send(_numbers(metrics), step)
            elif step > 0:
                self._send(_numbers(metrics), step, only=[t for t in self.trackers if t.resend_all])

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.trackers:
            return
        if event.get("kind") == "train_step" and "step" in event:
            self._send(_numbers(event), int(event["step"]))
        elif event.get("kind") == "evaluation":
            values = {f"eval/{event['model']}/{k}": v for k, v in _numbers(event.get("scores") or {}, set()).items()}
            self._each(lambda t: t.metrics(values, self.last_step, False))

    def _send(self, values: dict[str, float], step: int, only: list[Any] | None = None) -> None:
        redo = step <= self.last_step
        self._each(lambda t: t.metrics({f"train/{k}": v for k, v in values.items()}, step, redo), only)
        if only is None:
            self.last_step = step
            self._save()

    def _each(self, call: Callable[[Any], None], only: list[Any] | None = None) -> None:
        for tracker in self.trackers if only is None else only:
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker's outage must not stop training
                if tracker.name not in self.failed:
                    self.failed.add(tracker.name)
                    self.message(f"tracking: {tracker.name} failed ({type(exc).__name__}: {exc}); the job goes "
                                 "on, and its metrics stay in events.jsonl")

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"runs": {t.name: t.run_id for t in self.trackers}, "last_step": self.last_step}))
        os.replace(tmp, self.path)

    def report(self, written: list[Path]) -> None:
        """Send the report's files (``render_report``'s: report.md and the PNG plots)."""
        report_md = next((p for p in written if p.suffix == ".md"), None)
        plots = [p for p in written if p.suffix == ".png"]
        self._each(lambda t: t.report(report_md, plots, self.last_step))

    def finish(self, status: str) -> None:
        """End every run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self._each(lambda t: t.finish(status))
        self.trackers = []


def _reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail at once when an HTTP tracking server does not answer (MLflow's client retries a
    refused connection for minutes); any HTTP answer, even an error status, is a server."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass
    except OSError as exc:
        raise ConnectionError(f"no server answers at {uri} ({getattr(exc, 'reason', exc)})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
