"""A job record's progress columns: what each progress event changes in them (:func:`fold`,
applied by :meth:`~kdray.service.store.JobStore.append_event` in the event's transaction), and
the percent and ETA a status read derives from them (:func:`progress`)."""

from __future__ import annotations

import json
from typing import Any

#: A job's states after which it changes no more (the others: :data:`kdray.service.store.STATES`).
TERMINAL = ("succeeded", "failed", "cancelled")


def fold(kind: str, data: dict[str, Any], t: float) -> list[tuple[str, str, Any]]:
    """(column, SQL expression, bound value) for each progress column an event changes; the
    value is bound where the expression has a ``?``."""
    if kind == "phase_start":
        return [("phase", "?", data.get("phase")), ("phase_detail", "?", data.get("detail")),
                ("phase_done", "0", None), ("phase_total", "?", data.get("total")), ("phase_started", "?", t)]
    if kind == "advance":
        return [("phase_done", "phase_done + ?", int(data.get("n") or 0))]
    if kind == "phase_end":
        return [("phase_detail", "?", data.get("detail")), ("phase_done", "COALESCE(phase_total, phase_done)", None)]
    if kind == "train_step" and "step" in data:
        return [("step", "?", data.get("step")), ("total_steps", "?", data.get("total_steps")),
                ("round", "?", data.get("round")), ("metrics", "?", json.dumps(data)),
                ("first_step", "COALESCE(first_step, ?)", data.get("step")),
                ("first_step_time", "COALESCE(first_step_time, ?)", t)]
    return []


def progress(rec: dict[str, Any]) -> dict[str, Any]:
    """Percent of the current phase and, while training, an ETA from the step rate."""
    percent = None
    eta = None
    if rec.get("phase") == "train" and rec.get("total_steps"):
        percent = 100.0 * (rec.get("step") or 0) / rec["total_steps"]
        done = (rec.get("step") or 0) - (rec.get("first_step") or 0)
        if done > 0 and rec.get("first_step_time") and rec["state"] not in TERMINAL:
            rate = done / max(rec["updated"] - rec["first_step_time"], 1e-9)
            eta = (rec["total_steps"] - rec["step"]) / rate
    elif rec.get("phase_total"):
        percent = 100.0 * rec["phase_done"] / rec["phase_total"]
    if rec["state"] == "succeeded":
        percent = 100.0
    return {"percent": None if percent is None else round(min(percent, 100.0), 1),
            "eta_s": None if eta is None else round(eta, 1)}
