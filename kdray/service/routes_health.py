"""``/healthz``: the service is up and its store answers (the API docs are FastAPI's ``/docs``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from kdray.service.common import get_store
from kdray.service.store import JobStore

router = APIRouter(tags=["service"])


@router.get("/healthz", summary="The service is up; how many jobs its store holds")
def healthz(store: JobStore = Depends(get_store)) -> dict[str, Any]:
    return {"status": "ok", "jobs": store.list(limit=1)[1]}
