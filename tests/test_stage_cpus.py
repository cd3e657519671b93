"""Stages on a cluster their pool nearly fills: every task a stage runs beside its pool (reads,
keys, tokenizing, repartitioning, writes) takes a light share of a CPU, so a pool that leaves
only that share free still finishes, even once its output outgrows its object-store budget. A task
with Ray Data's default of a whole CPU would wait for the pool's CPUs, and the pool for it,
forever (:data:`kdray.pools.base.LIGHT_NUM_CPUS`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdray.spec import parse_spec

#: Ray Data's object-store budget in these tests: smaller than any block, so a pool's output
#: waits on what comes after it, as a real job's does once its output outgrows the store.
TINY_BUDGET = 4 * 2**10
ROWS = 96


@pytest.fixture
def tiny_store_budget(ray_cpus):
    """The driver's Ray Data budget shrunk to :data:`TINY_BUDGET` (the datasets a stage builds
    copy it), restored afterwards."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.resource_limits
    options.resource_limits = before.copy(object_store_memory=TINY_BUDGET)
    yield
    options.resource_limits = before


@pytest.mark.slow
@pytest.mark.timeout(240)  # a task waiting on the pool's CPUs waits forever
def test_stages_whose_pool_leaves_a_light_share_of_the_cpus_free_finish(tiny_store_budget, toy_world, tmp_path):
    """On 2 CPUs, HF pools of one replica reserving 1.75 of them: the teacher's responses, its
    top-k records and POCL's difficulty are each written whole, and a POCL stage's training
    rows stream while something else holds those 1.75 CPUs. The responses and the difficulty
    run under the tiny budget; the scorer under its own (:func:`kdray.pools.run.store_budget`),
    where the repartition feeding it is what would wait, from its first input."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from kdray.pipeline.progress import Reporter
    from kdray.stages import difficulty, generate, prepare, teacher_signal
    from kdray.stages.context import StageContext
    from kdray.stages.train import training_dataset

    model = {"backend": "hf", "dtype": "float32", "max_model_len": 128}
    spec = parse_spec({
        "name": "cpus", "output_dir": str(tmp_path / "out"),
        "teacher": {"model": "toy:teacher", **model}, "student": {"model": "toy:student", **model},
        "data": {"train": "toy:train", "heldout": "toy:heldout", "max_train_samples": ROWS, "max_prompt_tokens": 64},
        "generation": {"num_cpus_per_replica": 1.75, "max_new_tokens": 16, "batch_size": 8},
        "teacher_signal": {"mode": "topk", "k": 4},
        "objective": {"kind": "forward_kl", "kd_temperature": 1.0},
        "curriculum": {"kind": "pocl", "t_start": 1.0, "t_end": 1.0},
        "training": {"num_workers": 1, "global_batch_size": 8, "micro_batch_size_per_worker": 8, "max_seq_len": 96}})
    ctx = StageContext(spec, Path(spec.output_dir), Reporter(None))
    data = prepare.prepare(ctx)
    assert ray.cluster_resources()["CPU"] == 2

    responses = generate.training_responses(ctx, data.train)  # keys, tokenizing and writes beside the pool
    records, _, stats = teacher_signal.score_signal(ctx, responses)  # the scorer's repartition too
    order = difficulty.order_by_difficulty(ctx, responses)
    assert (responses.rows, records.rows, stats["rows"]) == (ROWS, ROWS, ROWS)
    assert stats["tokens"] > ROWS
    assert sorted(order) == sorted(responses.column("key"))

    easy = training_dataset(responses, order[: ROWS // 2])  # POCL's first stage, made before the workers start
    group = placement_group([{"CPU": 1.75}])  # as the workers and live pools hold theirs
    ray.get(group.ready())
    try:
        batches = list(easy.iter_batches(batch_format="numpy"))
    finally:
        remove_placement_group(group)
    assert sum(len(b["input_ids"]) for b in batches) == ROWS // 2
