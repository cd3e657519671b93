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


@pytest.fixture(scope="module")
def ray_cpus(tmp_path_factory):
    """A local Ray with 2 CPUs for a module's tests (Ray Data stages), quiet as a job's."""
    import logging

    import ray
    from ray.data import DataContext

    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars, context.print_on_execution_start = False, False
    yield
    ray.shutdown()
