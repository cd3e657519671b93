"""One toy world per job: every node that loads ``toy:...`` loads the build its driver resolved.

The toy world is built on first use into each node's ``KDRAY_CACHE_DIR/toy``. Two builds train
apart and differ (each has its own ``build_id``), so a node without the driver's world, or with
another build, would silently distil another teacher into another student. The driver pins its
build (:func:`pin_for_job`: ``KDRAY_TOY_BUILD_ID`` in its environment, which
:func:`kdray.ray_setup.job_env` hands to every Ray process of the job), and :func:`resolve`
checks it on every node, building nothing inside a job.

Kept apart from :mod:`kdray.toy.world`, whose source is the world's fingerprint: checking a
world is no reason to build a new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kdray.toy.world import TOY_REFS, ToyWorld, _is_complete, build_toy_world, cache_root, world_dir_name
from kdray.toy.world import resolve as world_resolve

#: The build id of the toy world a job's driver resolved, set by the driver for every Ray
#: process of the job (:func:`kdray.ray_setup.job_env`); unset outside a job.
BUILD_ID_ENV = "KDRAY_TOY_BUILD_ID"


def resolve(ref: str, *, cache_dir: str | Path | None = None) -> Path:
    """Path for a ``toy:`` reference (see :data:`TOY_REFS`), building the world on first use.

    Inside a job (:data:`BUILD_ID_ENV` set by its driver) nothing is built: the world under
    ``cache_dir`` (default :func:`~kdray.toy.world.cache_root`) must be the very build the
    driver resolved.

    Raises:
        ValueError: an unknown reference.
        ToyWorldError: inside a job, this node has no toy world there, or another build; the
            message names the node, both build ids and the fix.
    """
    expected = os.environ.get(BUILD_ID_ENV)
    if expected:
        _the_drivers_world(expected, cache_dir)  # complete and the driver's: resolving builds nothing
    return world_resolve(ref, cache_dir=cache_dir)


def pin_for_job(refs: list[str], *, progress: Callable[[str], None] | None = None) -> str | None:
    """On a job's driver, before Ray starts: when any of ``refs`` (the spec's model and data
    references) is a toy reference, the toy world (built here on first use), its build id set
    in :data:`BUILD_ID_ENV` for this process and, through :func:`kdray.ray_setup.job_env`,
    every Ray process of the job; returns that id. With no toy reference :data:`BUILD_ID_ENV`
    is unset and None returned."""
    os.environ.pop(BUILD_ID_ENV, None)  # an earlier job's, in this process
    if not any(ref in TOY_REFS for ref in refs):
        return None
    build_id = build_toy_world(progress=progress).meta["build_id"]
    os.environ[BUILD_ID_ENV] = build_id
    return build_id


def _the_drivers_world(expected: str, cache_dir: str | Path | None) -> ToyWorld:
    """The toy world under ``cache_dir`` if its build id is ``expected``; see :func:`resolve`."""
    from kdray.errors import ToyWorldError, node

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    world_dir = root / world_dir_name()
    fix = (f"every node must load the driver's toy world: put KDRAY_CACHE_DIR on storage every node mounts at "
           f"the same path (e.g. /shared/kdray-cache, see cluster/README.md), or copy the driver's "
           f"{world_dir_name()} directory (in its KDRAY_CACHE_DIR/toy) to {root} on every node")
    if not _is_complete(world_dir):
        raise ToyWorldError(f"node {node()} has no toy world at {world_dir}, and this job's driver resolved the "
                            f"build {expected}: building one here would train another teacher and student; {fix}")
    world = ToyWorld.load(world_dir)
    found = world.meta.get("build_id")
    if found != expected:
        raise ToyWorldError(f"node {node()} has the toy world {world_dir} of build {found}, but this job's driver "
                            f"resolved the build {expected}: the two were trained apart and differ; {fix}")
    return world
