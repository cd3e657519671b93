"""``/v1/jobs/{id}/events``: a job's progress history, as a JSON page or a server-sent event stream."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from kdray.service.common import RequestError, find_job, get_store, read_access
from kdray.service.store import TERMINAL, JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}/events", dependencies=[Depends(read_access)],
            summary="A job's progress history (JSON page, or a server-sent event stream with stream=true)")
def events(request: Request, job_id: str, after: int = 0, limit: int = 1000, stream: bool = False,
           store: JobStore = Depends(get_store)) -> Any:
    find_job(store, job_id)
    if after < 0 or not 1 <= limit <= 10000:
        raise RequestError(422, "invalid query",
                           errors=[{"field": "after/limit", "message": "after >= 0, 1 <= limit <= 10000"}])
    if stream:  # EventSource clients resume with Last-Event-ID
        last = request.headers.get("last-event-id", "")
        start = int(last) if last.isdigit() else after
        return StreamingResponse(event_stream(store, job_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return {"events": store.events(job_id, after=after, limit=limit)}


def event_stream(store: JobStore, job_id: str, after: int, poll_s: float = 0.5) -> Iterator[str]:
    """Server-sent events: every event after ``after`` as it is stored (``id`` = its seq,
    ``event`` = its kind), then one ``end`` event with the final state once the job ended."""
    seen = after
    while True:
        batch = store.events(job_id, after=seen, limit=500)
        for event in batch:
            seen = event["seq"]
            yield f"id: {seen}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
        if not batch:
            rec = store.get(job_id)
            if rec is None or rec["state"] in TERMINAL:
                yield f"event: end\ndata: {json.dumps({'state': rec['state'] if rec else None})}\n\n"
                return
            time.sleep(poll_s)
