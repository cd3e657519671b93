"""What a job has finished, kept in its output directory so a re-run resumes instead of
starting over.

``OUTPUT_DIR/state/`` holds:

* ``job.json``: the resolved spec the work was done for, the Ray Train run name of each
  segment (a re-run reuses the name, so Ray Train restores that run's latest checkpoint), and
  each finished segment's final checkpoint (DeepSpeed state and exported student), and the
  held-out scores of each segment's student (``evaluation.per_round``);

The rows a job makes (teacher and student responses, teacher records, POCL's measurements)
are committed datasets beside it (``datasets/``, ``records/``, ``curriculum/``:
:mod:`kdray.data.artifacts`); a re-run reuses each one that was committed.

A re-run with a different spec is refused (the saved work belongs to another job) unless
``kdray run --restart`` discards it; only the failure policy, memory settings that keep the
gradients, the experiment trackers and the way ``output_dir`` is written may change
(:data:`MAY_CHANGE_ON_RESUME`). Every file is written to a temporary name and renamed,
so an interrupted write never leaves a half file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kdray.errors import KdrayError
from kdray.spec import JobSpec

#: What ``--restart`` removes: everything a previous run of the job left to resume from, and
#: its held-out answers (a restarted job without the judge or rounds would keep stale ones).
RESUMABLE = ("state", "ray_train", "curriculum", "records", "datasets", "samples")
#: Spec fields a re-run may change: how the job survives failures or fits in memory, not what
#: it computes (a job that failed too often resumes with a higher ``max_failures``; one saved
#: under an older kdray's failure-policy defaults resumes under today's; one that ran out of
#: memory resumes with ``gradient_checkpointing``, which gives the same gradients).
MAY_CHANGE_ON_RESUME = ("training.max_failures", "training.checkpoint_every_steps",
                        "generation.max_replica_restarts",
                        "training.gradient_checkpointing", "training.gpu_memory_gb",
                        "tracking",  # where the metrics are also sent: a resumed job may add a tracker
                        "output_dir")  # the directory the state is in, written another way (relative, absolute)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def spec_differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like spec dumps differ (``training.lr``), sorted; ``(spec)``
    where the whole of one is not a mapping."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(now), key=str):
            out += spec_differences(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if saved == now else [prefix or "(spec)"]


def _with_defaults(saved: Any) -> Any:
    """A saved spec dump with the fields added since it was saved at their defaults (a new
    field's default keeps the old behaviour, so a job saved before the upgrade still resumes);
    as saved when it no longer validates (a field renamed or removed is a difference).

    One default changed the behaviour: ``objective.t_squared_scaling`` (2026-12-06). A job
    saved before it trained without T², which matters only where a KD temperature is not 1
    (POCL's stages, a set ``kd_temperature``): there the saved spec counts as false, so resuming
    it under the new default is a difference the user decides (the flag, or ``--restart``)."""
    try:
        spec = JobSpec.model_validate(saved)
        tempered = spec.objective.kd_temperature != 1.0 or any(
            (c.t_start, c.t_end) != (1.0, 1.0) for c in spec.curriculum if c.kind == "pocl")
        if tempered and "t_squared_scaling" not in (saved.get("objective") or {}):
            spec = spec.model_copy(update={"objective": spec.objective.model_copy(update={"t_squared_scaling": False})})
        return spec.model_dump(mode="json")
    except Exception:  # noqa: BLE001 - pydantic's ValidationError, or not a dict at all
        return saved


def _differences(saved_spec: Any, spec_dump: dict[str, Any]) -> list[str]:
    """The fields in which a recorded run's spec differs from ``spec_dump``, less those a re-run
    may change (:data:`MAY_CHANGE_ON_RESUME`)."""
    return [d for d in spec_differences(_with_defaults(saved_spec), spec_dump)
            if not any(d == m or d.startswith(m + ".") for m in MAY_CHANGE_ON_RESUME)]


def earlier_run_differences(out: Path, spec_dump: dict[str, Any]) -> list[str]:
    """The fields in which the spec of the earlier run recorded in ``out`` (``state/job.json``)
    differs from ``spec_dump`` (:func:`_differences`): [] when there is none, it is the same
    job, or its record is unreadable (the run itself then says so). For the service, which
    refuses such a submission before it queues (a run refuses it at its start)."""
    try:
        saved = json.loads((out / "state" / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return _differences(saved.get("spec") if isinstance(saved, dict) else None, spec_dump)


class JobState:
    """The resumable progress of one job in ``out``."""

    def __init__(self, out: Path, spec: JobSpec):
        self.dir = out / "state"
        self.spec_dump = spec.model_dump(mode="json")
        self.data: dict[str, Any] = {"spec": self.spec_dump, "runs": {}, "segments": {}}

    @classmethod
    def open(cls, out: Path, spec: JobSpec, *, restart: bool) -> "JobState":
        """The state of ``spec``'s job in ``out``: resumed, or fresh when there is none or
        ``restart`` (which deletes what an earlier run left). Refuses another job's state."""
        state = cls(out, spec)
        if restart:
            for name in RESUMABLE:
                shutil.rmtree(out / name, ignore_errors=True)
        path = state.dir / "job.json"
        if path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise KdrayError(f"{path} is not valid JSON ({exc}); run again with --restart to "
                                 "start the job over") from None
            differing = _differences(saved.get("spec"), state.spec_dump)
            if differing:
                shown = ", ".join(differing[:8]) + (" ..." if len(differing) > 8 else "")
                t2 = ("; it trained without the KD term's T², which kdray adds since 2026-12-06: set "
                      "objective.t_squared_scaling: false to resume it as it trained"
                      if "objective.t_squared_scaling" in differing else "")
                raise KdrayError(
                    f"output_dir {out} holds an earlier run of a job with a different spec "
                    f"(differs in: {shown}){t2}; pass --restart to discard that run, or choose "
                    "another output_dir"
                )
            state.data = saved
        state.dir.mkdir(parents=True, exist_ok=True)
        return state

    @property
    def resumed(self) -> bool:
        """Whether an earlier run of this job recorded any work (a Ray Train run name)."""
        return bool(self.data["runs"])

    def _save(self) -> None:
        _write_atomic(self.dir / "job.json", json.dumps(self.data, indent=2))

    # -- segments --------------------------------------------------------------------------
    def run_name(self, index: int, fresh: str) -> str:
        """The Ray Train run name of segment ``index``: the recorded one, else ``fresh``."""
        runs = self.data["runs"]
        if str(index) not in runs:
            runs[str(index)] = fresh
            self._save()
        return runs[str(index)]

    def finished(self, index: int) -> dict[str, Any] | None:
        """``{"checkpoint": dir | None, "student": dir}`` of a finished segment, else None."""
        done = self.data["segments"].get(str(index))
        if done is None or not Path(done["student"]).is_dir():
            return None
        return done

    def finish(self, index: int, checkpoint: str | None, student: str) -> None:
        """Record segment ``index`` as finished: its final checkpoint directory (None when the
        plan has no next segment to continue from it) and its exported student directory."""
        self.data["segments"][str(index)] = {"checkpoint": checkpoint, "student": student}
        self._save()

    # -- per-round evaluation --------------------------------------------------------------
    def round_score(self, index: int) -> dict[str, Any] | None:
        """The held-out scores of segment ``index``'s student, if an earlier run recorded them."""
        return self.data.get("round_scores", {}).get(str(index))

    def save_round_score(self, index: int, scores: dict[str, Any]) -> None:
        """Record the held-out scores of segment ``index``'s student (``evaluation.per_round``)."""
        self.data.setdefault("round_scores", {})[str(index)] = scores
        self._save()
