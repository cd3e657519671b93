"""Shared fixtures. The toy world is built once per machine (cached), then reused."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_world():
    from kdray.toy import build_toy_world

    return build_toy_world()
