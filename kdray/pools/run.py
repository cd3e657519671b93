"""Running a pool over a Ray dataset, sized by the spec's ``generation`` (replicas, GPUs and
CPUs per replica, batch size).

:func:`generate_dataset` answers prompts with a model's generator (vLLM: Ray's batch LLM
processor; hf: an actor pool, :func:`map_pool`); :func:`score_dataset` records the teacher's
signal on compact training examples with its scorer (an actor pool). Both return lazy
datasets, which a stage writes under the job's output directory. For a few rows held in the
driver (benchmarks, ``kdray repro``'s shared stages) :func:`generate` takes and returns
lists, in the order given: Ray Data does not keep order, so every row travels with its position
``_row``.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable


from kdray.data.tokenize import PromptEncoding
from kdray.pools import hf, vllm
from kdray.pools.base import BACKENDS, LIGHT_NUM_CPUS, ROLES, SamplingConfig, pool_env
from kdray.pools.placement import engine_placement, in_placement_group, uses_ray_executor
from kdray.spec import GenerationSpec, JobSpec, ModelSpec


def pool_class(backend: str, role: str = "generator") -> type:
    """The Ray Data callable class of a pool backend (``ModelSpec.backend``) and role; vLLM's
    generator is Ray's own processor (:func:`kdray.pools.vllm.generate_requests`), not a class."""
    if backend not in BACKENDS or role not in ROLES or (backend, role) == ("vllm", "generator"):
        raise ValueError(f"no pool class for {backend!r}/{role!r}; backends {BACKENDS}, roles {ROLES}")
    if backend == "hf":
        return hf.HFScorer if role == "scorer" else hf.HFGenerator
    return vllm.VLLMScorer


def pool_options(pool: GenerationSpec, role: str) -> dict[str, Any]:
    """``map_batches`` options of a pool in ``role`` on ``pool.replicas`` actors: batches of
    ``pool.batch_size`` rows, each actor reserving ``num_cpus_per_replica`` /
    ``num_gpus_per_replica`` and restarted at most ``max_replica_restarts`` times when its
    process dies. A scorer's actors take one batch at a time: its outputs (a batch's records)
    are large, and a second batch queued on an actor would only add another to the object
    store before the writer takes the first."""
    import ray.data

    in_flight = 1 if role == "scorer" else None
    options = dict(batch_size=pool.batch_size, batch_format="numpy",
                   compute=ray.data.ActorPoolStrategy(size=pool.replicas, max_tasks_in_flight_per_actor=in_flight),
                   num_cpus=pool.num_cpus_per_replica, num_gpus=pool.num_gpus_per_replica,
                   max_restarts=pool.max_replica_restarts)
    if uses_ray_executor(pool):  # a placement group per actor; vLLM's workers take its GPUs
        placement = engine_placement(pool)
        options.update(num_cpus=placement["bundles"][0]["CPU"], num_gpus=0,
                       ray_remote_args_fn=partial(in_placement_group, placement))
    return options


#: What one pool task's outputs may hold in the object store before the writer takes them
#: (:func:`pool_map`): two parquet files' worth (:data:`kdray.data.artifacts.FILE_BYTES`).
TASK_OUTPUT_BYTES = 32 * 2**20
#: Task outputs per replica a pool of large rows may hold in the object store at once
#: (:func:`store_budget`): the one its actor makes and the one the writer takes.
TASKS_IN_STORE_PER_REPLICA = 2


def store_budget(pool: GenerationSpec) -> int:
    """The object-store bytes a dataset of large rows (a scorer's records) may use while it is
    made and written: :data:`TASKS_IN_STORE_PER_REPLICA` task outputs per replica, so that
    every replica keeps working while the writer drains, and no more however many rows there
    are. Ray Data's own budget (a share of the cluster's store) lets a run's queues grow with
    its length until they reach it: top-k records of 8,000 rows peaked at 110-125 MiB and of
    64,000 at 221-228 MiB (``kdray bench scale``, 512 MiB store: docs/benchmarks.md); Ray keeps
    the lower of the two limits."""
    return TASKS_IN_STORE_PER_REPLICA * pool.replicas * TASK_OUTPUT_BYTES


def pool_map(ds: Any, fn: type, pool: GenerationSpec, role: str, *, row_bytes: int | None = None,
             **constructor_kwargs: Any) -> Any:
    """``ds`` mapped by the callable class ``fn`` on a pool's actors (:func:`pool_options`).

    With ``row_bytes`` (an upper bound of one output row's size, as a scorer's records have),
    the input is first cut into blocks whose outputs fit :data:`TASK_OUTPUT_BYTES`, in whole
    batches and at least one (Ray Data's streaming ``repartition(target_num_rows_per_block=…)``,
    no shuffle). Why: an actor task takes one input block and yields an output per batch of it,
    all held in the object store until the writer takes them, and Ray Data reads a stored
    dataset as a few blocks per CPU, so what one task held grew with the rows (``kdray bench
    scale``, hidden, 1,000 rows, 512 MiB store: a 511 MiB peak, 510 MiB spilled; with the cut,
    171 MiB, none). Cutting to one batch per task for small rows instead cost top-k scoring
    twice the time and the driver 60 MiB more at 32,000 rows (one task and block per batch).
    The result, and what is made of it (its write), may then use at most :func:`store_budget`
    of the object store. Lazy."""
    if row_bytes:
        per_block = max(1, TASK_OUTPUT_BYTES // (row_bytes * pool.batch_size)) * pool.batch_size
        ds = light_repartition(ds, per_block)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args_fn (removal: Ray 2.64) with no replacement yet; its
        # own LLM engine stage places tensor-parallel engines through it too (kdray pins Ray).
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        out = ds.map_batches(fn, fn_constructor_kwargs=constructor_kwargs, **pool_options(pool, role))
    if row_bytes:  # this dataset's context (its write's too), not the driver's
        options = out.context.execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=store_budget(pool))
    return out


def light_repartition(ds: Any, rows_per_block: int) -> Any:
    """``ds`` cut into blocks of ``rows_per_block`` rows by Ray Data's streaming repartition
    (no shuffle), its tasks taking a light CPU share (:data:`~kdray.pools.base.LIGHT_NUM_CPUS`):
    they feed a pool whose actors hold their CPUs from the start, so with Ray's default of a
    whole CPU a pool leaving less than one free waited for its first input forever (a scorer at
    1.75 of 2 CPUs: still waiting after 90 s). Ray 2.60's ``repartition`` takes no remote
    arguments, so they are set on the operator it adds to the plan (kdray pins Ray;
    ``tests/test_stage_cpus.py`` runs such a scorer). Lazy."""
    out = ds.repartition(target_num_rows_per_block=rows_per_block)
    op = out._logical_plan.dag
    if type(op).__name__ != "StreamingRepartition":  # another Ray: fail here, not hang later
        raise RuntimeError(f"Ray {__import__('ray').__version__} planned {type(op).__name__} for a streaming "
                           "repartition; kdray needs the Ray version it pins (pip install -e . again)")
    op.ray_remote_args["num_cpus"] = LIGHT_NUM_CPUS
    return out


def map_pool(ds: Any, model: ModelSpec, pool: GenerationSpec, role: str, *, row_bytes: int | None = None,
             **kwargs: Any) -> Any:
    """The Ray dataset ``ds`` mapped by ``model``'s pool class for ``role`` (:func:`pool_class`) with
    :func:`pool_map` (``row_bytes``: its outputs' size per row, when large); ``kwargs`` go to the class's constructor with the model, dtype,
    lengths, parallelism and environment. Lazy: nothing runs until the dataset is consumed."""
    return pool_map(ds, pool_class(model.backend, role), pool, role, row_bytes=row_bytes,
                    **pool_class_kwargs(model, pool), **kwargs)


def pool_class_kwargs(model: ModelSpec, pool: GenerationSpec) -> dict[str, Any]:
    """What every pool class's constructor takes (:func:`pool_class`): the model, its dtype and
    length, the pool's parallelism and engine options, and the actor environment
    (:func:`~kdray.pools.base.pool_env`). Raises :class:`~kdray.errors.ModelError` for a model
    its vLLM engine could not run (:func:`~kdray.pools.vllm.check_engine_support`)."""
    vllm.check_engine_support(model, pool)
    return dict(model=model.model, dtype=model.dtype, max_model_len=model.max_model_len,
                tensor_parallel_size=pool.tensor_parallel_size, enforce_eager=pool.enforce_eager,
                env=pool_env(pool), **(vllm.engine_options(pool) if model.backend == "vllm" else {}))


def generate_dataset(ds: Any, model: ModelSpec, pool: GenerationSpec, sampling: SamplingConfig, *,
                     score_gold: bool = False, encoding: PromptEncoding | None = None, progress: Any = None,
                     output_prefix: str = "") -> Any:
    """``model``'s answers to the rows of the Ray dataset ``ds`` (each with ``id`` and
    ``prompt``; every column is carried over), as a lazy dataset: one row per sample with
    ``response``, ``response_token_ids`` (int32), ``sample_index`` and ``finish_reason``, each
    name with ``output_prefix`` in front. Progress goes to the hub ``progress`` as output rows
    are made.

    With ``score_gold`` the rows also carry ``gold_response`` / ``gold_finish_reason``, and the
    model measures, per row, ROUGE-L of its answer against the gold response
    (``gold_rouge_l``) and its mean token cross-entropy in nats on it (``gold_ce``). The ``hf``
    backend puts both in the answer's row; ``vllm`` scores the gold response as a request of
    its own, whose row (``sample_index`` -1, ``gold_rouge_l`` NaN) carries ``gold_ce`` while
    the answer's carries NaN: join them by a row key (:func:`generate` does, by position).

    Backends: ``vllm`` runs on Ray's batch LLM processor (:func:`kdray.pools.vllm.generate_requests`);
    ``hf`` on an actor pool of :class:`kdray.pools.hf.HFGenerator` (:func:`map_pool`).

    Prompts are encoded with ``encoding``: a job passes its own
    (:meth:`kdray.stages.context.StageContext.prompt_encoding`) for every model it runs; None
    lets the model use its own chat template (benchmarks, direct use).
    """
    if model.backend == "vllm":
        return vllm.generate_requests(ds, model, pool, sampling, score_gold=score_gold, encoding=encoding,
                                      progress=progress, output_prefix=output_prefix)
    return map_pool(ds, model, pool, "generator", sampling=sampling, score_gold=score_gold,
                    encoding=encoding, progress=progress, output_prefix=output_prefix)


def generator_footprint(model: ModelSpec, pool: GenerationSpec) -> dict[str, float]:
    """The CPUs and GPUs that ``model``'s generator pool (:func:`generate_dataset`) holds for as
    long as it runs: its actors, ``pool.replicas`` engines (their placement groups' bundles,
    :func:`engine_placement`, or an hf replica's actor) and, for vLLM, as many request encoders.
    Its light tasks (a map each side of the engine) are left out: they hold a CPU only while
    they run, so a pool never waits on another's for long."""
    if model.backend != "vllm":
        return {"CPU": pool.replicas * float(pool.num_cpus_per_replica),
                "GPU": pool.replicas * float(pool.num_gpus_per_replica)}
    bundles = engine_placement(pool)["bundles"]
    return {"CPU": pool.replicas * (sum(b["CPU"] for b in bundles) + LIGHT_NUM_CPUS),
            "GPU": pool.replicas * sum(b.get("GPU", 0.0) for b in bundles)}


def generate(
    rows: list[dict[str, Any]],
    model: ModelSpec,
    pool: GenerationSpec,
    sampling: SamplingConfig,
    *,
    score_gold: bool = False,
    encoding: PromptEncoding | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`generate_dataset` for a few rows held in the driver (benchmarks, ``kdray repro``):
    the rows go in as a list and come back as one, in the order of ``rows`` (then
    ``sample_index``). A job's rows never take this path.

    Returns:
        One dict per sample: ``id``, ``prompt``, ``response``, ``response_token_ids``,
        ``sample_index``, ``finish_reason``, and with ``score_gold`` ``gold_ce`` and
        ``gold_rouge_l`` (``rows`` then need ``response`` and ``finish_reason``). ``on_rows(k)``
        is called as each batch of k output rows arrives.
    """
    import ray.data

    items = []
    for i, r in enumerate(rows):
        item = {"_row": i, "id": r["id"], "prompt": r["prompt"]}
        if score_gold:
            item.update(gold_response=r["response"], gold_finish_reason=r["finish_reason"])
        items.append(item)
    ds = generate_dataset(ray.data.from_items(items), model, pool, sampling, score_gold=score_gold,
                          encoding=encoding)
    results: list[tuple[int, dict[str, Any]]] = []
    gold_ce: dict[int, float] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = 0
        for i in range(len(batch["id"])):
            if int(batch["sample_index"][i]) < 0:  # a gold response's score (vllm)
                gold_ce[int(batch["_row"][i])] = float(batch["gold_ce"][i])
                continue
            row = {
                "id": str(batch["id"][i]),
                "prompt": str(batch["prompt"][i]),
                "response": str(batch["response"][i]),
                "response_token_ids": [int(t) for t in batch["response_token_ids"][i]],
                "sample_index": int(batch["sample_index"][i]),
                "finish_reason": str(batch["finish_reason"][i]),
            }
            if score_gold:
                row["gold_ce"] = float(batch["gold_ce"][i])
                row["gold_rouge_l"] = float(batch["gold_rouge_l"][i])
            results.append((int(batch["_row"][i]), row))
            n += 1
        if on_rows:
            on_rows(n)
    results.sort(key=lambda item: (item[0], item[1]["sample_index"]))
    for position, row in results:
        if position in gold_ce:
            row["gold_ce"] = gold_ce[position]
    return [row for _, row in results]


def score_dataset(ds: Any, spec: JobSpec, signal_meta: dict[str, Any] | None = None, *,
                  progress: Any = None, row_bytes: int | None = None) -> Any:
    """The teacher's records of the compact training examples in the Ray dataset ``ds``
    (``input_ids``, ``prompt_len``: :class:`kdray.data.examples.TokenizeForTraining`, the trainer's
    own ids, so records line up with its labels), from the teacher's scorer pool, as a lazy
    dataset: the input columns plus each row's record (``teacher_signal`` says what), encoded
    into the stored bytes of ``signal_meta`` when given (:mod:`kdray.data.records`), else as
    float32 arrays. ``row_bytes``: an upper bound of a records row's size (:func:`pool_map`)."""
    signal = spec.teacher_signal
    return map_pool(ds, spec.teacher, spec.generation, "scorer", row_bytes=row_bytes, mode=signal.mode,
                    k=signal.k, signal_meta=signal_meta, progress=progress)
