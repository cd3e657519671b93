"""``/v1/jobs/{id}/events``: a job's progress history, as a JSON page or a server-sent event stream;
``/v1/jobs/{id}/curve``: its per-step curve cut to a plot's width (:mod:`kdray.service.series`).

Streams scale with the pages that follow jobs (:class:`EventHub`): a stream is an async
generator that, while its job has nothing new, waits on the event loop (no thread, no slot of
the replica's thread pool), and one poller reads what is new for every followed job, once per
:data:`POLL_S` however many streams follow it, and hands it to them. At most ``max_streams``
are open at once; one more is refused with 429 and ``Retry-After``, and a page can poll the
JSON form meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kdray.service import series
from kdray.service.common import MAX_JOB_ID, RequestError, find_job, get_store, read_access
from kdray.service.store import TERMINAL, JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("kdray.service")

#: An event kind a page may ask for alone (``GET /v1/jobs/{id}/events?kind=``).
EVENT_KIND = re.compile(r"[a-z_]{1,32}")
#: Seconds between the poller's reads of the store while streams are open.
POLL_S = 0.5
#: Events of a followed job the hub keeps for its streams (the newest ones).
BUFFER = 1000
#: The state an ``end`` event gives for a job deleted while its stream was open
#: (:mod:`kdray.service.retention`); a stream ends on it as on a job's final states.
DELETED = "deleted"
ENDED = (*TERMINAL, DELETED)


def _frames(events: list[dict[str, Any]]) -> str:
    """Server-sent event frames, one per event (``id`` = its seq, ``event`` = its kind)."""
    return "".join(f"id: {e['seq']}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n" for e in events)


@dataclass
class _Followed:
    """What the hub knows of one followed job."""

    streams: int = 0
    head: tuple[int, str] | None = None  # (last buffered seq, state) as last polled
    since: int | None = None             # ``recent`` holds every event with a seq above it
    recent: list[dict[str, Any]] = field(default_factory=list)


class EventHub:
    """The replica's open event streams: their count against ``cap``, and one poller that
    reads what is new for every followed job, once, and wakes that job's streams.

    Per :data:`POLL_S` the poller reads the last event's seq and the state of every followed
    job in one query, and a job's new events in one more (kept, the newest :data:`BUFFER`, for
    all its streams). So 200 pages following a training job cost the store two reads per tick,
    not 200; a stream reads the store itself only for history older than what the hub keeps
    (its replay from ``after``). Used from the replica's event loop only (streams open in the
    handler; their slots come back on the loop too, when their response ends): no lock needed.
    """

    def __init__(self, store: JobStore, cap: int, poll_s: float = POLL_S):
        self.store, self.cap, self.poll_s = store, cap, poll_s
        self.open = 0
        self.jobs: dict[str, _Followed] = {}
        self._changed: asyncio.Condition | None = None
        self._poller: asyncio.Task | None = None
        self._reads: dict[tuple[Any, ...], asyncio.Future] = {}  # store reads in flight, by their arguments

    async def read(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``store.METHOD(*args, **kwargs)`` in the thread pool, shared by every stream that asks
        for the same read while it is in flight: 200 pages opening on one job at once (a
        reconnect after a restart) cost one read, not 200. Callers must not modify the result."""
        key = (method, args, tuple(sorted(kwargs.items())))
        future = self._reads.get(key)
        if future is None:
            future = asyncio.ensure_future(run_in_threadpool(getattr(self.store, method), *args, **kwargs))
            self._reads[key] = future
            future.add_done_callback(lambda _: self._reads.pop(key, None))
        return await asyncio.shield(future)  # a stream that leaves does not cancel the others' read

    def take(self) -> Callable[[], None] | None:
        """A slot for one more stream: the function that gives it back (once, however often it
        is called), or None at the cap."""
        if self.open >= self.cap:
            return None
        self.open += 1
        held = True

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                self.open -= 1
        return give_back

    async def stream(self, job_id: str, after: int, give_back: Callable[[], None]) -> AsyncIterator[str]:
        """Server-sent events of ``job_id``: every event after ``after`` as it is stored (a
        chunk of frames per read), then one ``end`` event with the final state once the job
        ended (:data:`DELETED` for a job deleted meanwhile). ``give_back`` (from :meth:`take`)
        runs when the stream ends, its client leaving included (Starlette then cancels the
        generator at its wait); the response (:class:`_Stream`) also runs it, for a client that
        left before the generator started."""
        job = self.jobs.setdefault(job_id, _Followed())
        job.streams += 1
        if self._changed is None:
            self._changed = asyncio.Condition()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            seen = after
            while True:
                from_hub = job.since is not None and seen >= job.since  # all it lacks is in the hub
                if from_hub:
                    batch, complete = [e for e in job.recent if e["seq"] > seen], True
                else:  # history older than the hub keeps: the store's, in one chunk per read
                    batch = await self.read("events", job_id, after=seen, limit=500)
                    complete = len(batch) < 500
                if batch:
                    yield _frames(batch)
                    seen = batch[-1]["seq"]
                if not complete:
                    continue
                head = job.head
                # Not polled yet, or the store has none of the events the last poll promised
                # (the job was deleted since): the store's word.
                if head is None or (not from_hub and not batch and head[0] > seen):
                    head = (await self.read("heads", (job_id,))).get(job_id, (seen, DELETED))
                if head[0] <= seen and head[1] in ENDED:
                    yield f"event: end\ndata: {json.dumps({'state': head[1]})}\n\n"
                    return
                if job.head is not None and job.head[0] > seen:
                    continue
                async with self._changed:
                    await self._changed.wait_for(lambda: job.head is not None and (job.head[0] > seen
                                                                                   or job.head[1] in ENDED))
        finally:
            give_back()
            job.streams -= 1
            if not job.streams and self.jobs.get(job_id) is job:
                del self.jobs[job_id]

    async def _poll(self) -> None:
        """While streams are open, every ``poll_s``: the followed jobs' heads in one read, and
        each job's new events in one more; the streams of a job that changed wake up. A job's
        published head never runs past what the hub holds of it, so its streams find there
        every event the head promises."""
        while self.jobs:
            try:
                await self._tick()
            except Exception:  # a store read failed (a lock held past its timeout): streams wait, the next tick retries
                log.exception("event streams: polling the store failed")
            finally:  # every tick, whatever changed before a failure: a waiting stream re-checks its job
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(self.poll_s)

    async def _tick(self) -> None:
        """One poll (:meth:`_poll`): the followed jobs' heads, and their new events."""
        heads = await run_in_threadpool(self.store.heads, list(self.jobs))
        for job_id, job in self.jobs.items():
            if job_id not in heads:  # deleted: its streams end once they have what the hub holds
                job.head = (job.recent[-1]["seq"] if job.recent else job.since or 0, DELETED)
        for job_id, (seq, state) in heads.items():
            job = self.jobs.get(job_id)
            if job is None:
                continue
            if job.since is None:  # from now on, the hub keeps what is new
                job.since = seq
            last = job.recent[-1]["seq"] if job.recent else job.since
            if seq > last:
                new = await run_in_threadpool(self.store.events, job_id, after=last, limit=BUFFER)
                job.recent = (job.recent + new)[-BUFFER:]
                job.since = job.recent[0]["seq"] - 1 if job.recent else job.since
                last = job.recent[-1]["seq"] if job.recent else last
            # Until the hub holds every event, the job is not over for its streams (else one
            # would end before the last events reached it).
            job.head = (min(seq, last), state if last >= seq else "running")


async def _hub_of_known_job(request: Request, store: JobStore, job_id: str) -> EventHub:
    """The app's :class:`EventHub`, once ``job_id`` is known to the store (a read shared with
    the other requests for it: pages open in bursts); a 404 otherwise."""
    hub: EventHub = request.app.state.events
    if len(job_id) > MAX_JOB_ID or await hub.read("get", job_id) is None:
        await run_in_threadpool(find_job, store, job_id)  # the 404
    return hub


@router.get("/{job_id}/events", dependencies=[Depends(read_access)],
            summary="A job's progress history (JSON page, or a server-sent event stream with stream=true)")
async def events(request: Request, job_id: str, after: int = 0, limit: int = 1000, stream: bool = False,
                 kind: str | None = None, store: JobStore = Depends(get_store)) -> Any:
    """The JSON page: ``{"events": [...]}``, those after ``after`` (at most ``limit``), of one
    ``kind`` only if given (``message``: the driver's messages, as the page shows them)."""
    hub = await _hub_of_known_job(request, store, job_id)
    if after < 0 or not 1 <= limit <= 10000:
        raise RequestError(422, "invalid query",
                           errors=[{"field": "after/limit", "message": "after >= 0, 1 <= limit <= 10000"}])
    if kind is not None and (stream or not EVENT_KIND.fullmatch(kind)):
        raise RequestError(422, "invalid query", errors=[{"field": "kind", "message": (
            "not with stream=true" if stream else f"{kind[:40]!r} is not an event kind (message, train_step, ...)")}])
    if not stream:
        return {"events": await run_in_threadpool(store.events, job_id, after=after, limit=limit, kind=kind)}
    last = request.headers.get("last-event-id", "")  # EventSource clients resume with Last-Event-ID
    start = int(last) if last.isascii() and last.isdigit() and len(last) <= 18 else after
    give_back = hub.take()  # last: nothing below can fail before the response owns the slot
    if give_back is None:
        raise RequestError(429, f"{hub.cap} event streams are open, the most this service keeps; retry later, "
                                f"or read GET /v1/jobs/{job_id}/events?after=N meanwhile", retry_after=5)
    return _Stream(hub.stream(job_id, start, give_back), give_back)


@router.get("/{job_id}/curve", dependencies=[Depends(read_access)],
            summary="A train_step number over the steps (the loss by default), cut to at most 2 points per span")
async def curve(request: Request, job_id: str, field: str = "loss", points: int = 1000,
                store: JobStore = Depends(get_store)) -> Any:
    """``{"seq", "field", "points": [[step, value], ...]}`` (:func:`kdray.service.series.curve`):
    what the page draws of a job's history, whatever its length, before it follows the
    events after ``seq``. 404 for no such job; 422 naming ``field`` (not a plain key, or one
    the job's steps do not hold) or ``points`` (outside 1..10000)."""
    hub = await _hub_of_known_job(request, store, job_id)
    wrong = series.problems(field, points)
    if wrong:
        raise RequestError(422, "invalid query", errors=[{"field": k, "message": v} for k, v in wrong.items()])
    try:
        return await hub.read("curve", job_id, field, points)
    except series.UnknownField as exc:
        raise RequestError(422, "invalid query", errors=[{"field": "field", "message": str(exc)}]) from None


class _Stream(StreamingResponse):
    """A server-sent event stream that gives its slot back however it ends: its generator's
    end, its client leaving, or a cancellation before the generator ever started."""

    def __init__(self, content: AsyncIterator[str], give_back: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.give_back = give_back

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.give_back()
