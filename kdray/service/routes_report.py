"""``/v1/jobs/{id}/report``, ``/report.md`` and ``/report.html``: a job's report, read from its
output directory once the job wrote it (a report an earlier job left there is not its).

Every file is read through :func:`_read_own`: a regular file itself (no symlink, no FIFO), up
to a size, since the output directory is shared storage that other processes write and the
replica runs beside the API token.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, PlainTextResponse

from kdray.pipeline.progress import finite
from kdray.report.html import CONTENT_SECURITY_POLICY, report_page
from kdray.service.common import RequestError, find_job, get_store, read_access
from kdray.service.store import TERMINAL, JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

#: What ``GET /v1/jobs/{id}/report`` returns of a job's report.json (the spec, the summary of its
#: steps and an older job's per-step history are left out, and never read: the status and the
#: events hold them).
REPORT_KEYS = ("name", "status", "started", "finished", "timings_s", "rows", "evaluation", "paired_differences",
               "judge", "student_dir", "plan")
#: Of :data:`REPORT_KEYS`, those a report.json written before 2026-12-06 lacks. Every kdray that
#: writes them writes them before ``plan``, so the read stops once the others are in, before an
#: older job's per-step history.
NEWER_REPORT_KEYS = frozenset({"paired_differences"})


#: The largest report.md the service hands out (a many-round job's is a few KB), and the most of
#: a report.json it reads through (a job's per-step history is in its own file; an older kdray's
#: report.json holds it, about 700 bytes a step, last or in the middle, and the read stops before
#: it when it comes last).
MAX_REPORT_BYTES, MAX_REPORT_JSON_BYTES = 8 << 20, 1 << 30


def _read_own(out: Path, name: str, limit: int, parse: Callable[[Any], Any] = lambda fh: fh.read()) -> Any:
    """``parse`` of the regular file ``out/name`` itself, open for binary reading (a symlink
    there is refused: the output directory is shared storage that other processes write, and
    the replica runs beside the API token), or None when there is none. Raises a 413 for one
    over ``limit`` bytes."""
    try:
        fd = os.open(out / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO there: no wait
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_size > limit:
            raise RequestError(413, f"{out / name} is over {limit >> 20} MiB; read it from the output directory")
        return parse(fh)


def _report_fields(fh: Any, path: Path) -> dict[str, Any] | None:
    """The top-level :data:`REPORT_KEYS` of a report.json, parsed as it is read (ijson): the
    values of other keys (the per-step history, the spec) are never built, and the read stops
    once every key but :data:`NEWER_REPORT_KEYS` is in (those come before the last of the
    others). None for a file that is not a JSON object. An older kdray wrote a NaN as ``NaN``
    (a step's ``grad_norm`` may be one), which is not JSON and stops ijson: such a file is
    parsed whole instead, its NaNs made None, up to :data:`MAX_REPORT_BYTES` (a 413
    beyond)."""
    import ijson

    found: dict[str, Any] = {}
    key, builder = None, None
    try:
        for prefix, event, value in ijson.parse(fh, use_float=True):
            if prefix == "" and event in ("map_key", "end_map"):
                if builder is not None:
                    found[key] = builder.value
                if event == "end_map" or set(REPORT_KEYS) - NEWER_REPORT_KEYS <= found.keys():
                    return found
                key, builder = value, (ijson.ObjectBuilder() if value in REPORT_KEYS else None)
            elif builder is not None:
                builder.event(event, value)
    except ijson.JSONError:
        fh.seek(0)
        raw = fh.read(MAX_REPORT_BYTES + 1)
        if len(raw) > MAX_REPORT_BYTES:
            raise RequestError(413, f"{path} is over {MAX_REPORT_BYTES >> 20} MiB and holds a NaN or an infinity, "
                                    "which JSON cannot (an older kdray wrote them): read it from the output "
                                    "directory") from None
        try:
            whole = json.loads(raw)
        except ValueError:  # not JSON
            return None
        found = {k: finite(whole[k]) for k in REPORT_KEYS if k in whole} if isinstance(whole, dict) else None
    return found


def _report(store: JobStore, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the job's record, its report.json's :data:`REPORT_KEYS`), or a 404 until this job wrote
    it: a report from an earlier job in the same output_dir (started before this one) is not
    this job's."""
    rec = find_job(store, job_id)
    out = Path(rec["output_dir"])
    own = Path(os.path.realpath(out)) == out
    path = out / "report.json"
    report = _read_own(out, path.name, MAX_REPORT_JSON_BYTES, lambda fh: _report_fields(fh, path)) if own else None
    if report is None or rec.get("started") is None or float(report.get("started") or 0) < rec["started"] - 1:
        if report is not None and rec.get("started") is not None:
            why = f"{path} is an earlier job's, which started before this one in the same output_dir"
        elif rec["state"] in TERMINAL:
            why = "it ended before writing one (its driver log says why)"
        else:
            why = "a job writes it as it ends"
        raise RequestError(404, f"job {job_id} has no report ({rec['state']}): {why}", state=rec["state"])
    return rec, report


@router.get("/{job_id}/report", summary="The job's report: evaluation table, judge, timings, where the student is",
            dependencies=[Depends(read_access)])
def report(job_id: str, store: JobStore = Depends(get_store)) -> Any:
    _, data = _report(store, job_id)
    return {k: data.get(k) for k in REPORT_KEYS}


@router.get("/{job_id}/report.md", summary="The job's report.md", dependencies=[Depends(read_access)])
def report_md(job_id: str, store: JobStore = Depends(get_store)) -> Any:
    rec, _ = _report(store, job_id)
    text = _read_own(Path(rec["output_dir"]), "report.md", MAX_REPORT_BYTES)
    if text is None:
        raise RequestError(404, f"job {job_id} has no report.md", state=rec["state"])
    return PlainTextResponse(text.decode("utf-8", errors="replace"), media_type="text/markdown")


#: The largest plot the report's page takes in (the plots kdray draws are 50-150 KB).
MAX_PLOT_BYTES = 8 << 20


@router.get("/{job_id}/report.html", summary="The job's report.md as a page, its plots in it",
            dependencies=[Depends(read_access)], response_class=HTMLResponse)
def report_html(job_id: str, store: JobStore = Depends(get_store)) -> Any:
    """report.md rendered (:func:`kdray.report.html.report_page`), its plots inlined: the web
    page shows it in a sandboxed frame; served with a policy that lets it run no script and
    make no request."""
    rec, _ = _report(store, job_id)
    out = Path(rec["output_dir"])
    text = _read_own(out, "report.md", MAX_REPORT_BYTES)
    if text is None:
        raise RequestError(404, f"job {job_id} has no report.md", state=rec["state"])

    def plot(name: str) -> bytes | str:
        try:
            data = _read_own(out, name, MAX_PLOT_BYTES)
        except RequestError:  # over the limit
            return f"over {MAX_PLOT_BYTES >> 20} MiB"
        return "not a file of the job's output directory" if data is None else data

    page = report_page(text.decode("utf-8", errors="replace"), f"kdray job {rec['name']} ({job_id})", plot)
    return HTMLResponse(page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})
