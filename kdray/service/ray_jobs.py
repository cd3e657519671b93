"""Ray's Job Submission API as the service uses it, with Ray's failures sorted out.

* Ray's dashboard cannot be reached, answers 5xx, refuses the service's credentials, or does
  not answer within the service's ``ray_timeout_s``: a :class:`~kdray.errors.ClusterError` (the
  service answers 503: a retry can help);
* Ray no longer knows the job (its cluster restarted): ``None`` (the job's logs are gone, it
  cannot be running);
* anything else Ray refuses is a request kdray built wrongly: the exception goes on (a 500).
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

from kdray.errors import ClusterError, first_line
from kdray.service.config import DEFAULT_RAY_TIMEOUT_S

_STATUS = re.compile(r"status code (\d{3})")
#: How long a submit retries while Ray's job API refuses it for now (see :meth:`RayJobs.submit`).
SUBMIT_RETRY_S = 20.0
#: The most seconds to connect to Ray's dashboard (the read timeout is the service's
#: ``ray_timeout_s``, :data:`~kdray.service.config.DEFAULT_RAY_TIMEOUT_S`). Ray's SDK sets no
#: timeout, so a dashboard that accepts connections but never answers (its head overloaded or
#: stopped) would hold the reconciler, or a request's thread, for good.
CONNECT_TIMEOUT_S = 10.0
#: Seconds after a job's end before :meth:`RayJobs.delete` removes its record. A job's
#: supervisor actor exits right after writing the job's end, and Ray's job manager, checking
#: each supervisor once a second (Ray 2.60's ``JOB_MONITOR_LOOP_PERIOD_S``), writes a job whose
#: supervisor is gone and whose record is not ended back as FAILED: a record deleted in between
#: came back (seen deleting a cancelled job at once, tests/test_service.py).
SETTLE_S = 3.0


def _client(dashboard_url: str, timeouts: tuple[float, float]) -> Any:
    """Ray's ``JobSubmissionClient`` for ``dashboard_url`` with ``timeouts`` (connect, read) on
    every request it makes, its connection check included: all of them go through
    ``_do_request``, which hands its keyword arguments to ``requests.request`` (Ray 2.60)."""
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        def __init__(self, address: str):
            self._kdray_timeouts = timeouts
            super().__init__(address)

        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self._kdray_timeouts)
            return super()._do_request(method, endpoint, **kwargs)

    return Client(dashboard_url)


def submission_id(job_id: str) -> str:
    """The Ray job id the service submits kdray job ``job_id`` under (Ray's ``submission_id``):
    fixed by the record, so the job can be found in Ray before its id is saved."""
    return f"kdray-{job_id}"


class RayJobs:
    """A lazily connected ``JobSubmissionClient`` for the dashboard at ``dashboard_url``."""

    def __init__(self, dashboard_url: str, *, timeout_s: float = DEFAULT_RAY_TIMEOUT_S):
        self.dashboard_url, self.timeout_s = dashboard_url, timeout_s
        self._client: Any = None

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``, or None when Ray answers 404 (it does not know the job)."""
        import requests

        try:
            if self._client is None:
                self._client = _client(self.dashboard_url, (min(CONNECT_TIMEOUT_S, self.timeout_s), self.timeout_s))
            return fn(self._client)
        except requests.exceptions.ReadTimeout:  # connected, no answer (a connect timeout: unavailable, below)
            raise ClusterError(f"{what}: Ray's job API at {self.dashboard_url} did not answer within "
                               f"{self.timeout_s:g} s; retry once the Ray cluster's head is responsive") from None
        except (OSError, RuntimeError) as exc:
            code = _STATUS.search(str(exc)) if isinstance(exc, RuntimeError) else None
            if code is not None and code.group(1) == "404":
                return None
            unavailable = isinstance(exc, OSError) or (code is not None and code.group(1).startswith("5"))
            if not (unavailable or type(exc).__name__ == "AuthenticationError"):
                raise
            agent = (" (where it lasts, the head's dashboard agent runs without its HTTP server: the "
                     "dashboard_agent.log in the Ray session's logs on the head says why, most often its port, "
                     "52365, held by another process)") if "No available agent" in str(exc) else ""
            raise ClusterError(f"{what}: Ray's job API at {self.dashboard_url} is unavailable "
                               f"({first_line(exc)}); retry once the Ray cluster is up{agent}") from None

    def submit(self, entrypoint: str, submission_id: str, *, retry_s: float = SUBMIT_RETRY_S) -> str:
        """Hand ``entrypoint`` to Ray as job ``submission_id``; returns Ray's job id.

        Ray's job API refuses submits for a while after it starts ("No available agent to
        submit job, please try again later", a 500) and may drop a connection: such refusals
        are retried for ``retry_s`` seconds. The submission id makes a retry safe: Ray keeps
        one job per id, so a retry that finds the job there means an earlier attempt got it in.

        Raises:
            ClusterError: Ray's job API stayed unavailable for ``retry_s``, or answered 404.
        """
        deadline = time.monotonic() + retry_s
        while True:
            try:
                ray_id = self._call("Ray did not accept the job",
                                    lambda c: c.submit_job(entrypoint=entrypoint, submission_id=submission_id))
            except ClusterError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
                continue
            except RuntimeError as exc:  # not a transient refusal: a job of that id may already be there
                if "already exists" in str(exc):  # ids are one per record: it is this job
                    return submission_id
                raise
            if ray_id is None:
                raise ClusterError(f"Ray did not accept the job: its job API at {self.dashboard_url} answered 404; "
                                   "retry once the Ray cluster is up")
            return ray_id

    def logs(self, ray_id: str) -> str | None:
        """The job's driver log, or None when Ray no longer has the job."""
        return self._call("the job's driver log could not be read", lambda c: c.get_job_logs(ray_id))

    def stop(self, ray_id: str) -> bool | None:
        """Ask Ray to stop the job: whether it was running, or None when Ray no longer has it."""
        return self._call("Ray could not stop the job", lambda c: c.stop_job(ray_id))

    def delete(self, ray_id: str) -> bool | None:
        """Remove an ended job's info from Ray's job table (Ray keeps its log files on the head's
        disk: Ray's ``delete_job``): True, or None when Ray no longer has it. Ray answers a job
        not yet ended with a 500 (a :class:`ClusterError` here): ask :meth:`status` first. A job
        that ended under :data:`SETTLE_S` ago is waited for until then."""
        info = self._call("Ray did not report the job", lambda c: c.get_job_info(ray_id))
        if info is None:
            return None
        if info.end_time:  # ms since the epoch
            time.sleep(max(0.0, SETTLE_S - (time.time() - info.end_time / 1000)))
        return self._call("Ray could not delete the job", lambda c: c.delete_job(ray_id))

    def status(self, ray_id: str) -> str | None:
        """``PENDING``, ``RUNNING``, ``STOPPED``, ``SUCCEEDED``, ``FAILED``, or None when Ray no
        longer knows the job."""
        status = self._call("Ray did not report the job's status", lambda c: c.get_job_status(ray_id))
        return None if status is None else str(status).rsplit(".", 1)[-1]
