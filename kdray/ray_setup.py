"""Joining or starting Ray with the environment every kdray process needs."""

from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Any

from kdray.caches import local_cache_dir
from kdray.errors import ClusterError, first_line

#: Seconds between Ray Train's polls of its workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's
#: default 2). A worker's ``ray.train.report`` waits in a one-slot queue until a poll takes the
#: one before it. kdray's workers send their metrics about once every
#: :data:`kdray.train.worker.REPORT_INTERVAL_S` (1 s), so polled at half that, a metrics report
#: does not wait; a checkpoint or a segment's final report right after one may wait up to this
#: long, and the end of a run is seen up to about twice this later. Each poll is an actor call on
#: every worker, so polling faster costs the workers' time (0.1 s trained 4% fewer tokens/s than
#: 0.5 in the bench's toy job, four interleaved pairs, docs/benchmarks.md) and the controller's.
#: Kept at 0.1: at 0.5 a CI run of tests/test_e2e.py found the cluster without room for the
#: held-out pools together right after training (not yet explained; docs/benchmarks.md).
TRAIN_POLL_INTERVAL_S = 0.1


def job_env() -> dict[str, str]:
    """Environment for every Ray process of a job; values already set in ours win.

    Ray Train's poll interval (:data:`TRAIN_POLL_INTERVAL_S`: a metrics report does not wait
    for it), and a cache for compiled extensions (DeepSpeed's JIT-built ops; training builds none, see
    :func:`kdray.train.setup.training_deepspeed`), one per Python environment: a build embeds
    the environment's include paths, so two environments sharing one directory rebuild in turn
    (:func:`extensions_dir`).

    Two caches, two variables: ``KDRAY_CACHE_DIR`` (the toy world; on a cluster it may, and
    for toy jobs must, be shared storage) and ``KDRAY_LOCAL_CACHE_DIR`` (:func:`kdray.caches.local_cache_dir`:
    compile caches, which must stay on each node's own disk: nodes that build into one shared
    directory at once race on its lock files and half-written objects). Both default to
    ``~/.cache/kdray``. The job's toy world build ids (``KDRAY_TOY_BUILD_ID``,
    ``KDRAY_GRAMMAR_BUILD_ID``, set by the driver, :func:`kdray.toy.pin_for_job`) travel too,
    when set.
    """
    from kdray.toy.pinning import BUILD_ID_ENVS

    cache = os.environ.get("KDRAY_CACHE_DIR", os.path.expanduser("~/.cache/kdray"))
    local = local_cache_dir()
    defaults = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(TRAIN_POLL_INTERVAL_S),
        "TORCH_EXTENSIONS_DIR": extensions_dir(local),
        "KDRAY_CACHE_DIR": cache,
        "KDRAY_LOCAL_CACHE_DIR": local,
        "TOKENIZERS_PARALLELISM": "false",
    }
    env = {key: os.environ.get(key, value) for key, value in defaults.items()}
    env.update({name: os.environ[name] for name in BUILD_ID_ENVS.values() if os.environ.get(name)})
    return env


def extensions_dir(cache: str) -> str:
    """``<cache>/torch_extensions/py<major><minor>-<8 hex of sys.prefix>``.

    torch keys its extension cache by Python and CUDA version only, and rebuilds an extension
    whenever its ``build.ninja`` changes; DeepSpeed's include paths point into the environment,
    so a demo's ``.venv`` and a CI clone's would otherwise rebuild an op (DeepSpeed's shm_comm
    took ~40 s) in turn."""
    import hashlib
    import sys

    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    return os.path.join(cache, "torch_extensions", f"py{sys.version_info[0]}{sys.version_info[1]}-{tag}")


#: Logical CPUs a local Ray declares beyond the machine's cores, for the reads that stream
#: the training data while the workers hold their CPUs (:func:`init_ray`).
INGEST_CPUS = 1


#: The starts of Ray's log lines that a kdray driver drops: notices about how kdray drives Ray
#: (its batch LLM processor re-joins Ray from each pool's thread), none of which asks anything
#: of the user. They were 17 of the 21 lines Ray logged in a demo job (Ray 2.60).
RAY_NOTICES = (
    "Calling ray.init() again after it has already been called",  # each ray.data.llm processor
    "SIGTERM handler is not set because current thread is not the main thread",  # the same, in a pool's thread
    "The argument ``concurrency`` is deprecated",  # ray.data.llm's own engine stage; kdray's maps use compute=
    "No cloud storage mirror configured",  # ray.data.llm, for a local model
    "Progress bars disabled",  # kdray draws its own (init_ray turns Ray Data's off)
)
#: The start of a Python warning of Ray Data's that a kdray driver drops: a light task's bound
#: (kdray.data.light_tasks) is a most, which a small dataset's single block does not reach.
RAY_DATA_WARNING = "The maximum number of concurrent tasks for "


class _DropNotices(logging.Filter):
    """Drops the records whose message starts with one of :data:`RAY_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RAY_NOTICES)


def quiet_ray_notices() -> None:
    """Put :class:`_DropNotices` on the handlers of Ray's loggers in this process (``ray`` and
    those of its children that print for themselves); idempotent.

    ``ray.llm``'s modules give each logger a handler of its own when they are imported, unless
    the ``ray.llm`` logger has one (Ray 2.60, ``ray.llm._internal.common.observability.logging``):
    it gets a ``NullHandler``, so those imported later log through ``ray``'s handler, filtered.
    Also ignores the Python warning :data:`RAY_DATA_WARNING`."""
    import warnings

    importlib.import_module("ray")  # its import gives the ``ray`` logger its handler

    warnings.filterwarnings("ignore", message=re.escape(RAY_DATA_WARNING), category=UserWarning)

    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
    names = ["ray", *(name for name in list(logging.root.manager.loggerDict) if name.startswith("ray."))]
    for handler in {h for name in names for h in logging.getLogger(name).handlers}:
        if not any(isinstance(f, _DropNotices) for f in handler.filters):
            handler.addFilter(_DropNotices())


#: Why joining a cluster by its address may fail though it is up: Ray 2.60 turns token
#: authentication on for a `ray start` where a token exists, and a process joining by address
#: uses it only when told (docs.ray.io, "Token authentication"); kdray does not switch it on
#: itself, since a driver whose mode differs from the cluster's loses its objects.
AUTH_HINT = ("; and if the cluster uses Ray's token authentication (a `ray start` where ~/.ray/auth_token "
             "exists turns it on), set RAY_AUTH_MODE=token here too, with the cluster's token in "
             "~/.ray/auth_token or RAY_AUTH_TOKEN")


def init_ray(address: str | None, *, dashboard: bool = False, dashboard_port: int | None = None) -> Any:
    """Connect to ``address`` (or ``RAY_ADDRESS``: the job's cluster), else start a local Ray of
    this process's own (also on a node where ``ray start`` ran), with the job env.

    A local Ray gets a dashboard only when asked (``kdray serve`` needs it: Ray's Job
    Submission API lives there), on ``dashboard_port`` when given (Ray's default: 8265).
    Returns Ray's context (None if Ray was already up)."""
    import ray

    env = job_env()
    os.environ.update(env)
    if ray.is_initialized():
        return None
    from ray.data import DataContext

    kwargs: dict[str, Any] = dict(
        runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING
    )
    if address:
        kwargs["address"] = address
    elif "RAY_ADDRESS" not in os.environ:
        # "local": a Ray of this process's own. Without it ray.init() joins the cluster of this
        # node's last `ray start` (Ray's ray_current_cluster file), which refuses num_cpus.
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = dashboard
        if dashboard and dashboard_port is not None:
            kwargs["dashboard_port"] = dashboard_port
        # One logical CPU more than the machine has: Ray Data's reads feeding the training
        # workers need a CPU to be scheduled while each worker holds one.
        kwargs["num_cpus"] = (os.cpu_count() or 1) + INGEST_CPUS
    try:
        context = ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        target = address or os.environ.get("RAY_ADDRESS")
        where = f"join the Ray cluster at {target!r}" if target else "start a local Ray"
        raise ClusterError(
            f"cannot {where} ({first_line(exc)}); check the address (kdray run --address, RAY_ADDRESS), "
            f"that the cluster is up (`ray status` on its head node) and runs Ray {ray.__version__}"
            + (AUTH_HINT if target and "RAY_AUTH_MODE" not in os.environ else "")
        ) from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet_ray_notices()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return context


#: How long the trainers wait for GPUs that are still held when a segment starts (a finished
#: pool's actors exiting, its placement groups going away) before the job fails.
GPU_WAIT_S = 300.0


def wait_for_free_gpus(needed: float, timeout: float = GPU_WAIT_S, poll_s: float = 0.5) -> float:
    """Return once ``needed`` GPUs are free in Ray's resource view (what training workers
    reserve); returns the seconds waited. A cluster with fewer GPUs than ``needed`` in all
    returns at once: an autoscaler adds them when Ray Train asks.

    Raises:
        ClusterError: still not free after ``timeout`` s, with the free and total counts, the
            placement groups holding GPUs, and the fixes.
    """
    import time

    import ray

    t0 = time.monotonic()
    while True:
        total = ray.cluster_resources().get("GPU", 0.0)
        free = ray.available_resources().get("GPU", 0.0)
        if free >= needed or total < needed:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(poll_s)
    from ray.util import placement_group_table

    holders = [f"{gid} ({sum(b.get('GPU', 0.0) for b in info['bundles'].values()):g} GPUs, {info['state']})"
               for gid, info in placement_group_table().items()
               if info["state"] != "REMOVED" and any(b.get("GPU") for b in info["bundles"].values())]
    raise ClusterError(
        f"training needs {needed:g} free GPUs, and {free:g} of the cluster's {total:g} were still free after "
        f"{timeout:.0f} s; placement groups holding GPUs: {', '.join(holders) or 'none'} (another job's, or "
        "actors that did not exit). Wait for them to end (ray list placement-groups / ray list actors show "
        "them) and run the job again (it resumes), or lower training.num_workers")
