"""Pools on GPUs, on a real local Ray that declares two GPUs (Ray schedules logical GPUs; no
device is touched): what a replica reserves, its placement group, vLLM's environment, the
GPUs given back when a pool's dataset is written, and the trainers' wait for them."""

from __future__ import annotations

import threading
import time

import pytest

from kdray.errors import ClusterError, KdrayError
from kdray.spec import GenerationSpec, parse_spec


@pytest.fixture(scope="module")
def ray_gpus(tmp_path_factory):
    import logging

    import sys

    import ray
    from ray import cloudpickle
    from ray.data import DataContext

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is no package: Ray's workers cannot import it
    ray.init(num_cpus=4, num_gpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars, context.print_on_execution_start = False, False
    yield
    ray.shutdown()


def _free_gpus() -> float:
    import ray

    return ray.available_resources().get("GPU", 0.0)


def _wait_free(n: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _free_gpus() < n:
        assert time.monotonic() < deadline, f"{_free_gpus()} GPUs free after {timeout}s, expected {n}"
        time.sleep(0.1)


# -- the spec -----------------------------------------------------------------------------------

def test_gpu_memory_utilization_defaults_to_the_share_of_a_gpu_and_replicas_sharing_one_must_fit():
    assert GenerationSpec().vllm_gpu_memory_utilization() is None  # CPU replicas
    assert GenerationSpec(num_gpus_per_replica=1).vllm_gpu_memory_utilization() == 0.9
    assert GenerationSpec(num_gpus_per_replica=0.5).vllm_gpu_memory_utilization() == 0.45
    assert GenerationSpec(num_gpus_per_replica=2, tensor_parallel_size=2).vllm_gpu_memory_utilization() == 0.9
    assert GenerationSpec(num_gpus_per_replica=0.25, gpu_memory_utilization=0.25).vllm_gpu_memory_utilization() == 0.25
    # 0.4 GPU each: two fit on a GPU, at 0.45 each (90%)
    assert GenerationSpec(num_gpus_per_replica=0.4, gpu_memory_utilization=0.45).vllm_gpu_memory_utilization() == 0.45
    with pytest.raises(ValueError, match=r"too much for replicas of 0.5 GPU: Ray may place 2 of them on one GPU"
                                         r".*120%.*at most 0.5 "):
        GenerationSpec(num_gpus_per_replica=0.5, gpu_memory_utilization=0.6)
    with pytest.raises(ValueError, match="num_gpus_per_replica is 0"):
        GenerationSpec(gpu_memory_utilization=0.5)
    for gpus, tp in ((1.5, 2), (3, 2), (4, 2), (1.5, 1), (2, 1)):  # Ray takes no fraction above 1; unused GPUs
        with pytest.raises(ValueError, match=rf"set num_gpus_per_replica to {tp}\b"):
            GenerationSpec(num_gpus_per_replica=gpus, tensor_parallel_size=tp)
    with pytest.raises(ValueError, match="too small a share of a GPU"):
        GenerationSpec(num_gpus_per_replica=1e-5)


def test_a_job_names_the_field_and_refuses_gpu_memory_utilization_for_hf_pools(toy_world):
    base = {"name": "g", "output_dir": "/tmp/kdray-g", "teacher": {"model": "toy:teacher", "backend": "hf"},
            "student": {"model": "toy:student", "backend": "hf"}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
            "generation": {"num_gpus_per_replica": 1, "gpu_memory_utilization": 0.8}}
    with pytest.raises(KdrayError, match="generation.gpu_memory_utilization is set: it is vLLM's setting"):
        parse_spec(base)
    base["teacher"]["backend"] = "vllm"
    assert parse_spec(base).generation.vllm_gpu_memory_utilization() == 0.8


# -- what a replica asks Ray for ----------------------------------------------------------------

def test_cpu_replicas_get_the_cpu_engine_settings_and_gpu_replicas_do_not():
    from kdray.pools.base import VLLM_CPU_ENV, pool_env
    from kdray.pools.vllm import engine_options

    cpu, gpu = GenerationSpec(), GenerationSpec(num_gpus_per_replica=1)
    assert VLLM_CPU_ENV.items() <= pool_env(cpu).items()
    assert not set(VLLM_CPU_ENV) & set(pool_env(gpu)) and "VLLM_CACHE_ROOT" in pool_env(gpu)
    assert engine_options(cpu) == {}
    assert engine_options(gpu) == {"gpu_memory_utilization": 0.9}
    assert engine_options(GenerationSpec(num_gpus_per_replica=2, tensor_parallel_size=2)) == {
        "gpu_memory_utilization": 0.9, "distributed_executor_backend": "ray"}


def test_resource_requests_of_one_device_and_tensor_parallel_replicas():
    from kdray.pools.placement import engine_placement
    from kdray.pools.run import pool_options

    one = pool_options(GenerationSpec(num_gpus_per_replica=0.5, num_cpus_per_replica=0.5), "scorer")
    assert (one["num_cpus"], one["num_gpus"]) == (0.5, 0.5) and "ray_remote_args_fn" not in one
    tp = GenerationSpec(num_gpus_per_replica=2, tensor_parallel_size=2, num_cpus_per_replica=0.5)
    assert engine_placement(tp) == {"bundles": [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 0.25, "GPU": 1.0}],
                                    "strategy": "STRICT_PACK"}
    options = pool_options(tp, "scorer")
    assert (options["num_cpus"], options["num_gpus"]) == (1.0, 0) and "ray_remote_args_fn" in options
    # CPU replicas: Ray's processor sums the bundles into the actor's own request
    assert engine_placement(GenerationSpec(tensor_parallel_size=2)) == {
        "bundles": [{"CPU": 0.25}, {"CPU": 0.25}], "strategy": "STRICT_PACK"}


class TensorParallelEngine:
    """Stands in for a vLLM engine on its Ray executor: at start it places one worker actor per
    bundle of its placement group, each with a whole GPU and no CPU, as
    ``vllm.v1.executor.ray_executor`` does; a batch reports where they run."""

    def __init__(self):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.get_current_placement_group()
        assert group is not None, "the engine actor is not in a placement group"
        self.group = group.id.hex()

        @ray.remote(num_cpus=0, num_gpus=1)
        class Worker:
            def gpus(self):
                return ray.get_runtime_context().get_accelerator_ids()["GPU"]

        self.workers = [Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i)).remote() for i in range(len(group.bundle_specs))]
        self.gpus = sorted(g for w in self.workers for g in ray.get(w.gpus.remote()))

    def __call__(self, batch):
        import numpy as np

        n = len(batch["id"])
        return {"id": batch["id"], "group": np.asarray([self.group] * n), "gpus": np.asarray([",".join(self.gpus)] * n)}


def test_a_tensor_parallel_replica_runs_in_its_own_group_and_its_gpus_come_back_after_the_write(ray_gpus):
    import ray
    import ray.data

    from kdray.pools.placement import releasing_placement_groups
    from kdray.pools.run import pool_map

    pool = GenerationSpec(num_gpus_per_replica=2, tensor_parallel_size=2, num_cpus_per_replica=0.5, batch_size=4)
    with releasing_placement_groups():
        rows = pool_map(ray.data.range(8), TensorParallelEngine, pool, "scorer").take_all()
        assert _free_gpus() == 0  # the group outlives the pool's actors: Ray keeps it until removed
    assert sorted(r["id"] for r in rows) == list(range(8))
    assert {r["gpus"] for r in rows} == {"0,1"} and len({r["group"] for r in rows}) == 1
    from ray.util import placement_group_table

    info = placement_group_table()[rows[0]["group"]]
    assert info["strategy"] == "STRICT_PACK" and [b.get("GPU") for b in info["bundles"].values()] == [1.0, 1.0]
    _wait_free(2)
    assert placement_group_table()[rows[0]["group"]]["state"] == "REMOVED"


class TensorParallelJudge(TensorParallelEngine):
    """A judge on the stand-in tensor-parallel engine: it answers every judge prompt "A"."""

    def __call__(self, batch):
        import numpy as np

        return {**batch, "response": np.asarray(["A"] * len(batch["id"]), dtype=object)}


@pytest.mark.timeout(120)  # a group-by waiting on CPUs a group holds would wait forever
def test_the_judge_pairs_its_verdicts_once_its_tensor_parallel_pool_gives_its_cpus_back(ray_gpus, toy_world,
                                                                                        tmp_path, monkeypatch):
    """A tensor-parallel replica's placement group keeps its CPUs after its stage, here 3.5 of
    the cluster's 4, and the group-by pairing an item's two verdicts runs shuffle tasks of a
    whole CPU each: the judge removes its pool's groups before the group-by
    (StageContext.materialize), so it runs, and samples/judge/ holds one row per item."""
    import ray.data
    from ray.util import placement_group_table

    from kdray.data.artifacts import write_dataset
    from kdray.pipeline.progress import Reporter
    from kdray.pools.placement import engine_placement
    from kdray.pools.run import pool_map
    from kdray.stages import evaluate, judge
    from kdray.stages.context import StageContext

    _wait_free(2)
    pool = GenerationSpec(num_gpus_per_replica=2, tensor_parallel_size=2, num_cpus_per_replica=3.5, batch_size=4)
    assert sum(b["CPU"] for b in engine_placement(pool)["bundles"]) == 3.5  # 0.5 CPU left beside the group
    calls: list[str] = []

    def judge_pool(requests, *args, **kwargs):
        answered = pool_map(requests, TensorParallelJudge, pool, "scorer")
        calls.append("judge")
        return answered

    monkeypatch.setattr(judge, "generate_dataset", judge_pool)
    rows = range(6)
    heldout = write_dataset(ray.data.from_items([{"_row": r, "id": f"q{r}", "prompt": f"Q{r}:", "response": "g"}
                                                 for r in rows]), tmp_path / "heldout", "prompts")
    answers = {side: write_dataset(ray.data.from_items([{c: r if c == "_row" else f"{side}{r}"
                                                         for c in evaluate.ANSWER_COLUMNS} for r in rows]),
                                   tmp_path / side, evaluate.ANSWERS_KIND) for side in ("student_after", "teacher")}
    spec = parse_spec({"name": "t", "output_dir": str(tmp_path / "out"), "teacher": {"model": "toy:teacher"},
                       "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
                       "evaluation": {"judge": {"model": {"model": "toy:teacher", "max_model_len": 128},
                                                "template": "{prompt}{a}|{b}"}}})
    summary = judge.judge(StageContext(spec, tmp_path / "out", Reporter(None)), heldout, answers)
    assert calls == ["judge"]
    assert (summary["items"], summary["comparisons"]) == (6, 12)
    assert summary["verdicts"]["student_first"]["A"] == summary["verdicts"]["student_second"]["A"] == 6
    ours = [gid for gid, info in placement_group_table().items()
            if [b.get("GPU") for b in info["bundles"].values()] == [1.0, 1.0]]
    assert ours and all(placement_group_table()[gid]["state"] == "REMOVED" for gid in ours)
    _wait_free(2)


def test_releasing_keeps_groups_made_before_it(ray_gpus):
    import ray

    from kdray.pools.placement import releasing_placement_groups

    older = ray.util.placement_group([{"GPU": 1}])
    ray.get(older.ready())
    with releasing_placement_groups():
        newer = ray.util.placement_group([{"GPU": 1}])
        ray.get(newer.ready())
    _wait_free(1)
    from ray.util import placement_group_table

    table = placement_group_table()
    assert table[older.id.hex()]["state"] == "CREATED" and table[newer.id.hex()]["state"] == "REMOVED"
    ray.util.remove_placement_group(older)
    _wait_free(2)


# -- the trainers' wait -------------------------------------------------------------------------

def test_the_trainers_wait_for_gpus_a_pool_still_holds_and_fail_naming_what_holds_them(ray_gpus):
    import ray

    from kdray.ray_setup import wait_for_free_gpus

    _wait_free(2)
    assert wait_for_free_gpus(2) < 1
    held = ray.util.placement_group([{"GPU": 1}, {"GPU": 1}])
    ray.get(held.ready())
    timer = threading.Timer(1.5, ray.util.remove_placement_group, args=(held,))
    timer.start()
    try:
        waited = wait_for_free_gpus(2, timeout=60, poll_s=0.1)
    finally:
        timer.join()
    assert 1.0 <= waited < 60
    stuck = ray.util.placement_group([{"GPU": 1}])
    ray.get(stuck.ready())
    try:
        assert wait_for_free_gpus(4, timeout=60) < 1  # more than the cluster has: Ray Train asks an autoscaler
        with pytest.raises(ClusterError) as caught:
            wait_for_free_gpus(2, timeout=0.5, poll_s=0.1)
    finally:
        ray.util.remove_placement_group(stuck)
    message = str(caught.value)
    assert "training needs 2 free GPUs, and 1 of the cluster's 2" in message
    assert f"{stuck.id.hex()} (1 GPUs, CREATED)" in message and "training.num_workers" in message


def test_pools_start_together_only_where_the_cluster_holds_all_of_them(ray_gpus):
    """Held-out evaluation starts its pools at once only when the free resources hold every
    pool together (StageContext.each_pool): pools that each got some of their replicas
    could wait for the rest forever."""
    from kdray.pools.run import generator_footprint
    from kdray.spec import ModelSpec
    from kdray.stages.context import fit_together

    vllm, hf = ModelSpec(model="toy:teacher"), ModelSpec(model="toy:teacher", backend="hf")
    cpu = generator_footprint(vllm, GenerationSpec(num_cpus_per_replica=0.5))
    assert cpu == {"CPU": 0.5 + 0.25, "GPU": 0.0}  # the engine and the request encoder (its tasks come and go)
    gpu = generator_footprint(vllm, GenerationSpec(num_gpus_per_replica=1, num_cpus_per_replica=1, replicas=1))
    assert gpu == {"CPU": 1 + 0.25, "GPU": 1.0}
    tp = generator_footprint(vllm, GenerationSpec(num_gpus_per_replica=2, tensor_parallel_size=2,
                                                  num_cpus_per_replica=0.5, replicas=2))
    assert tp == {"CPU": 2 * (1.0 + 0.25 + 0.25), "GPU": 4.0}
    assert generator_footprint(hf, GenerationSpec(replicas=2, num_cpus_per_replica=1)) == {"CPU": 2.0, "GPU": 0.0}
    # this cluster: 4 CPUs, 2 GPUs, all free
    assert fit_together([cpu] * 5)  # 3.75 CPUs, and a light task's 0.25 to spare
    assert not fit_together([{"CPU": 3.9, "GPU": 0.0}])  # no CPU left for the light tasks
    assert not fit_together([cpu] * 6)  # 4.5 CPUs
    assert fit_together([gpu]) and not fit_together([gpu] * 3)  # 3 GPUs of 2
