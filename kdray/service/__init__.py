"""The job service: :mod:`.app` (FastAPI on Ray Serve, jobs as Ray jobs), :mod:`.store` (the
SQLite job store), :mod:`.client` (``kdray serve`` and the client commands).

``kdray.service:app_builder`` is the Ray Serve import path of the service (``serve run``,
KubeRay's RayService); it is resolved lazily so that importing the store or the client does
not import FastAPI and Ray Serve.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app_builder", "deployment", "ServiceConfig", "build_app"):
        from kdray.service import app

        return getattr(app, name)
    raise AttributeError(f"module 'kdray.service' has no attribute {name!r}")
