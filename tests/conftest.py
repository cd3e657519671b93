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


def pytest_addoption(parser):
    parser.addoption(
        "--part", choices=("all", "end-to-end", "light"), default="all",
        help="kdray: run only the modules holding an end-to-end test (marked slow or multinode; "
             "each starts a local Ray and keeps both cores busy most of the time), or only the others. "
             "make test runs the two parts at once, in two processes (default: all).")


def pytest_collection_modifyitems(config, items):
    """``--part``: keep the end-to-end modules' tests, or the light modules' (a module is
    end-to-end when one of its tests is ``slow`` or ``multinode``: its module-scoped fixtures
    then start once, in one part)."""
    part = config.getoption("--part")
    if part == "all":
        return
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("multinode")}
    keep = [item for item in items if (item.path in heavy) == (part == "end-to-end")]
    dropped = [item for item in items if (item.path in heavy) != (part == "end-to-end")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
