"""One build of each toy world per job: every node that loads ``toy:...`` loads the build its
driver resolved.

A world (:data:`kdray.toy.world.RECIPES`) is built on first use into each node's
``KDRAY_CACHE_DIR/<world>``. Two builds train apart and differ (each has its own ``build_id``),
so a node without the driver's world, or with another build, would silently distil another
teacher into another student. The driver pins the builds its spec names (:func:`pin_for_job`:
``KDRAY_TOY_BUILD_ID``, ``KDRAY_GRAMMAR_BUILD_ID`` in its environment, which
:func:`kdray.ray_setup.job_env` hands to every Ray process of the job), and :func:`resolve`
checks them on every node, building nothing inside a job.

Kept apart from :mod:`kdray.toy.world`, whose source is the worlds' fingerprint: checking a
world is no reason to build a new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kdray.toy.world import RECIPES, ToyWorld, _is_complete, build_world, cache_root, world_dir_name, world_of
from kdray.toy.world import resolve as world_resolve

#: Per world, the variable holding the build id of it that a job's driver resolved, set by the
#: driver for every Ray process of the job (:func:`kdray.ray_setup.job_env`); unset outside a job.
BUILD_ID_ENVS: dict[str, str] = {"toy": "KDRAY_TOY_BUILD_ID", "grammar": "KDRAY_GRAMMAR_BUILD_ID"}
BUILD_ID_ENV = BUILD_ID_ENVS["toy"]
assert set(BUILD_ID_ENVS) == set(RECIPES)


def resolve(ref: str, *, cache_dir: str | Path | None = None) -> Path:
    """Path for a ``toy:`` reference (:data:`~kdray.toy.world.TOY_REFS`,
    :data:`~kdray.toy.world.GRAMMAR_REFS`), building its world on first use.

    Inside a job (its world's :data:`BUILD_ID_ENVS` variable set by the driver) nothing is
    built: the world under ``cache_dir`` (default :func:`~kdray.toy.world.cache_root`) must be
    the very build the driver resolved.

    Raises:
        ValueError: an unknown reference.
        ToyWorldError: inside a job, this node has no such world there, or another build; the
            message names the node, both build ids and the fix.
    """
    world = world_of(ref)
    expected = os.environ.get(BUILD_ID_ENVS[world])
    if expected:
        _the_drivers_world(world, expected, cache_dir)  # complete and the driver's: resolving builds nothing
    return world_resolve(ref, cache_dir=cache_dir)


def pin_for_job(refs: list[str], *, progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """On a job's driver, before Ray starts: each world that one of ``refs`` (the spec's model
    and data references) belongs to, built here on first use, its build id set in its
    :data:`BUILD_ID_ENVS` variable for this process and, through
    :func:`kdray.ray_setup.job_env`, every Ray process of the job. Returns ``{world: build
    id}``, empty when no reference is a toy one; the other worlds' variables are unset."""
    unpin()  # an earlier job's, in this process
    pinned = {}
    for world in RECIPES:
        if any(ref in RECIPES[world].refs for ref in refs):
            pinned[world] = build_world(world, progress=progress).meta["build_id"]
            os.environ[BUILD_ID_ENVS[world]] = pinned[world]
    return pinned


def unpin() -> None:
    """Unset every world's build id variable (a job's driver, once the job ends)."""
    for name in BUILD_ID_ENVS.values():
        os.environ.pop(name, None)


def _the_drivers_world(world: str, expected: str, cache_dir: str | Path | None) -> ToyWorld:
    """``world`` under ``cache_dir`` if its build id is ``expected``; see :func:`resolve`."""
    from kdray.errors import ToyWorldError, node

    root = Path(cache_dir) if cache_dir is not None else cache_root(world)
    name = world_dir_name(world)
    world_dir = root / name
    fix = (f"every node must load the driver's {world} world: put KDRAY_CACHE_DIR on storage every node mounts "
           f"at the same path (e.g. /shared/kdray-cache, see cluster/README.md), or copy the driver's "
           f"{name} directory (in its KDRAY_CACHE_DIR/{RECIPES[world].name}) to {root} on every node")
    if not _is_complete(world_dir):
        raise ToyWorldError(f"node {node()} has no {world} world at {world_dir}, and this job's driver resolved "
                            f"the build {expected}: building one here would train another teacher and student; {fix}")
    built = ToyWorld.load(world_dir)
    found = built.meta.get("build_id")
    if found != expected:
        raise ToyWorldError(f"node {node()} has the {world} world {world_dir} of build {found}, but this job's "
                            f"driver resolved the build {expected}: the two were trained apart and differ; {fix}")
    return built
