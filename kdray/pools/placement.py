"""Where a pool's replicas run on a cluster with GPUs, and giving their GPUs back.

A vLLM replica with ``tensor_parallel_size`` > 1 on GPUs runs one engine worker per shard on
vLLM's Ray executor, each worker a Ray actor of its own. Ray accounts for those workers' GPUs
only inside a placement group that holds them: one bundle per shard, all on one node
(``STRICT_PACK``: shards exchange activations every layer, over NVLink or PCIe, never across
nodes). The generator gets that group from Ray's batch LLM processor
(``placement_group_config``, :func:`engine_placement`); kdray's own scorer gets it from
:func:`in_placement_group`, called by Ray Data once per actor it starts.

Ray removes neither kind of group when the dataset is done: they hold their GPUs until the
driver exits, so the trainers of the same job would wait for GPUs forever.
:func:`releasing_placement_groups` removes the groups a pool made once its dataset is written
(a job is one Ray job: every group of this job made meanwhile is the pool's).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from kdray.spec import GenerationSpec


#: CPUs of the actor that holds a tensor-parallel engine (its workers take the GPUs): what Ray
#: Data gives a GPU stage's actor when not told otherwise, as Ray's LLM engine stage leaves it.
ENGINE_ACTOR_CPUS = 1.0


def uses_ray_executor(pool: GenerationSpec) -> bool:
    """Whether ``pool``'s vLLM engines run their workers on vLLM's Ray executor (tensor
    parallelism on GPUs), in a placement group per replica; otherwise one process per engine."""
    return pool.num_gpus_per_replica > 0 and pool.tensor_parallel_size > 1


def engine_placement(pool: GenerationSpec) -> dict[str, Any]:
    """``ray.util.placement_group`` arguments for one replica of ``pool``: a bundle per engine
    worker (``tensor_parallel_size`` of them), each with its share of the replica's CPUs and
    GPUs (``num_cpus_per_replica`` / tp, ``num_gpus_per_replica`` / tp), all on one node. On
    vLLM's Ray executor the engine's own actor runs in the group too, in the first bundle,
    which then holds at least :data:`ENGINE_ACTOR_CPUS` (an actor that fits no bundle would
    wait forever)."""
    tp = pool.tensor_parallel_size
    bundle = {"CPU": pool.num_cpus_per_replica / tp}
    if pool.num_gpus_per_replica:
        bundle["GPU"] = pool.num_gpus_per_replica / tp
    bundles = [dict(bundle) for _ in range(tp)]
    if uses_ray_executor(pool):
        bundles[0]["CPU"] = max(bundles[0]["CPU"], ENGINE_ACTOR_CPUS)
    return {"bundles": bundles, "strategy": "STRICT_PACK"}


def in_placement_group(placement: dict[str, Any]) -> dict[str, Any]:
    """Ray Data's ``ray_remote_args_fn`` for a replica in a placement group of its own: called
    in the driver before each actor starts, it creates the group (``placement``:
    :func:`engine_placement`) and returns the actor's scheduling strategy, which its child
    actors (vLLM's workers, which find the group with ``get_current_placement_group``) inherit."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group(**placement)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def _job_groups() -> set[str]:
    """Ids (hex) of this Ray job's placement groups that are not removed. A placement group's
    id ends with the id of the job that made it (Ray's ``PlacementGroupID::Of(job_id)``)."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return {gid for gid, info in placement_group_table().items()
            if gid.endswith(job) and info["state"] != "REMOVED"}


@contextmanager
def releasing_placement_groups() -> Iterator[None]:
    """Run a pool's work; then remove every placement group this Ray job made meanwhile (the
    pool's engines', whose GPUs Ray would otherwise hold until the driver exits). Their
    actors are killed with them: use it around work that has consumed the pool's dataset."""
    import ray

    if not ray.is_initialized():
        yield
        return
    before = _job_groups()
    try:
        yield
    finally:
        from ray._raylet import PlacementGroupID
        from ray.util import remove_placement_group
        from ray.util.placement_group import PlacementGroup

        for gid in _job_groups() - before:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(gid)))
