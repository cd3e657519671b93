"""Shared fixtures. The toy world is built once per machine (cached), then reused."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_world():
    from kdray.toy import build_toy_world

    return build_toy_world()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded: on tiny tensors intra-op threads only add scheduling
    overhead (a lot of it on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
