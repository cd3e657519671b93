"""``GET /``: the service's web page (``web/index.html`` and its scripts, :data:`SCRIPTS`, no other
resource) that reads the API from the browser: the jobs table (state, phase, progress, step,
ETA; refreshed every 3 s; 100 a page, with a state filter) and, for the job picked, the curve of
its loss or another per-step number (``GET /v1/jobs/{id}/curve``, then its event stream), the
driver's messages (``GET /v1/jobs/{id}/events?kind=message``, then the stream), its held-out
evaluation table, its report (``GET /v1/jobs/{id}/report.html``, in a sandboxed frame)
and its driver log. The bearer token is entered once and kept in the tab's session storage; the
page itself holds no data, so it needs none."""

from __future__ import annotations

from importlib import resources
from typing import Callable

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(tags=["service"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    html = resources.files("kdray.service").joinpath("web/index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


#: The page's scripts: its own (the table, a job's detail) and its plot's.
SCRIPTS = ("page.js", "plot.js")


def _script(name: str) -> Callable[[], Response]:
    """The handler of ``GET /NAME``: the file itself (it takes no parameter, so no request
    names another file)."""
    def script() -> Response:
        text = resources.files("kdray.service").joinpath(f"web/{name}").read_text(encoding="utf-8")
        return Response(text, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
    return script


for _name in SCRIPTS:
    router.add_api_route(f"/{_name}", _script(_name), methods=["GET"], include_in_schema=False)
