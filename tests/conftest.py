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


#: The xdist group of every test in a module holding an end-to-end test (``slow`` or
#: ``multinode``): under ``make test`` (``-n 2 --dist loadgroup``) they run one after another on
#: one worker, as alone, while the other worker runs the light modules.
HEAVY_GROUP = "end-to-end"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Group the tests for ``pytest -n 2 --dist loadgroup --no-loadscope-reorder`` (``make test``).

    The end-to-end modules each start a local Ray and use both cores most of the time: two at
    once would race for them (and for memory) and run slower each, so they share one group,
    which one worker runs in order, first (they are moved to the front; the light tests' order
    among themselves is kept). A light module is a group of its own, so its module-scoped
    fixtures start once. Without xdist the groups are inert marks and only the order changes.
    """
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("multinode")}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(HEAVY_GROUP if item.path in heavy else item.path.stem))
    items.sort(key=lambda item: item.path not in heavy)  # stable: each side keeps its order
