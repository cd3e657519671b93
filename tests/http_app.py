"""A service app on a real HTTP server (uvicorn, no Ray) on a free local port, for the tests
that drive it as its clients do: a browser, the kdray CLI."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import uvicorn

from kdray.bench.service import free_port


@contextmanager
def serving(app: Any, port: int | None = None) -> Iterator[str]:
    """``app`` served on 127.0.0.1 (at ``port``, else a free one) until the block ends; yields its URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
