"""The live student pool of on-policy distillation (``curriculum: {kind: on_policy}``), and of
DistiLLM's replay with ``sampler: pool`` (:func:`live_pool_of`).

Unlike the other pools, which Ray Data runs over a dataset before or after training, this one
lives beside the trainers for a whole segment: ``replicas`` Ray actors, each holding one vLLM
engine of the student, that the training workers call directly. A worker sends the prompt ids
of a micro-batch (:meth:`StudentSampler.sample`) and gets the student's samples back with the
version of the weights that made them; rank 0 pushes the trainers' weights
(:meth:`StudentSampler.load_weights`, the state dict through Ray's object store) every
``sync_every_steps`` optimizer steps. Each actor runs one call at a time, in the order the
calls arrive, so a sample asked for after a push comes from the pushed weights.

The weights go into the running engine through the worker's ``reload_weights`` (vLLM's in-place,
layer-by-layer reload: the model's own ``load_weights`` takes HF names and fuses q/k/v and
gate/up, then each layer's post-load processing runs again, such as the CPU backend's repacking
of linear weights, which a bare ``load_weights`` would miss), called with ``LLM.collective_rpc``;
then the prefix cache is reset, as vLLM's RLHF examples do. The engine runs in the actor's
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, on GPUs too), so the weights are handed over
without another copy; one device per replica (scale out with ``replicas``).

With ``teacher_signal: topk`` on-policy samples are graded by a live *teacher* pool too
(:class:`TeacherScorer`, :func:`start_live_pools`): the teacher's scorer of the records stage
(:func:`kdray.pools.run.pool_class`), on ``generation``'s replicas and resources, as Ray actors
alive for the segment. A worker chains the two calls: the student's samples go from the student
replica straight to a teacher replica (Ray passes the first call's result to the second), which
returns them as compact training examples with the teacher's top-k record of each, in the job's
records layout (:mod:`kdray.data.records`), so the worker collates them as it collates records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kdray.data.examples import sample_examples
from kdray.errors import KdrayError
from kdray.models import load_tokenizer, stop_token_ids
from kdray.pools.base import PoolCallable, SamplingConfig, check_lengths, pool_env
from kdray.pools.placement import engine_placement, in_placement_group, uses_ray_executor
from kdray.pools.vllm import check_engine_support, engine_options, start_engine
from kdray.spec import GenerationSpec, JobSpec


class StudentSampler(PoolCallable):
    """One replica of the live student pool: a vLLM engine and the version of its weights.

    Args:
        model: the student's weights to start from (a path or a model reference).
        dtype, max_model_len, enforce_eager: the engine's settings (the student's ModelSpec and
            the pool's GenerationSpec).
        seed: the engine's seed; every request carries its own (see :meth:`sample`).
        version: the optimizer step the starting weights are from.
        env: the actor's environment (:func:`~kdray.pools.base.pool_env`), set before vLLM imports.
        engine: what GPU replicas add (:func:`~kdray.pools.vllm.engine_options`).
    """

    def __init__(self, model: str, *, dtype: str, max_model_len: int, enforce_eager: bool, seed: int,
                 version: int, env: dict[str, str], **engine: Any):
        super().__init__(env)
        self.model, self.max_model_len, self.version = model, max_model_len, version
        self.llm = start_engine(model, dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=1,
                                enforce_eager=enforce_eager, seed=seed, **engine)
        self.stop_ids = set(stop_token_ids(load_tokenizer(model, need_pad=False), model))

    def ready(self) -> int:
        """The version served (a call that returns once the engine has started)."""
        return self.version

    def sample(self, prompts: list[list[int]], sampling: SamplingConfig) -> dict[str, Any]:
        """``sampling.n`` samples of each prompt (token ids), request ``i`` seeded ``sampling.seed + i``.

        Returns:
            ``{"responses": [[ids] * n per prompt, flattened prompt-major], "finish_reasons":
            ["stop" | "length", ...], "version": the weights' step, "generate_s": seconds}``;
            a response that stopped keeps its stop token, as the data set's responses do.

        Raises:
            DataError: a prompt longer than ``max_model_len`` allows with ``max_new_tokens``.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_lengths([len(p) + sampling.max_new_tokens for p in prompts], self.max_model_len, self.model,
                      "prompt + max_new_tokens")
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(sampling.n)]
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=sampling.seed + i)
                  for i in range(len(requests))]
        start = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        took = time.perf_counter() - start
        answers = [out.outputs[0] for out in outputs]
        return {"responses": [list(a.token_ids) for a in answers],
                "finish_reasons": ["stop" if a.finish_reason == "stop" else "length" for a in answers],
                "version": self.version, "generate_s": took}

    def load_weights(self, weights: dict[str, Any], version: int) -> int:
        """Serve ``weights`` (HF names → CPU tensors, :func:`kdray.train.setup.merged_state_dict`)
        from now on, as version ``version``; returns it.

        Raises:
            KdrayError: the weights do not fit the engine's model (another architecture or size).
        """
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items()),
                                                              "is_checkpoint_format": True})
        except (KeyError, RuntimeError, ValueError, AssertionError) as exc:
            raise KdrayError(f"the student pool's engine ({self.model!r}) could not load the trainers' weights "
                             f"of step {version}: {exc}") from None
        self.llm.reset_prefix_cache()
        self.version = version
        return version


class TeacherScorer:
    """One replica of the live teacher pool (module docstring): the teacher's scorer
    (:class:`~kdray.pools.vllm.VLLMScorer` or :class:`~kdray.pools.hf.HFScorer`, by
    ``backend``) grading the student's samples as they are made.

    Args:
        backend: the teacher's ``ModelSpec.backend``.
        scorer: the scorer's constructor arguments (:func:`kdray.pools.run.pool_class_kwargs`,
            ``mode``, ``k`` and ``signal_meta``, the records layout its answers are encoded in).
    """

    def __init__(self, backend: str, **scorer: Any):
        from kdray.pools.run import pool_class

        self.scorer = pool_class(backend, "scorer")(**scorer)

    def ready(self) -> int:
        """0, once the engine has started (as :meth:`StudentSampler.ready` answers its version)."""
        return 0

    def score(self, prompts: list[list[int]], samples: dict[str, Any], max_seq_len: int) -> dict[str, Any]:
        """The student's ``samples`` (:meth:`StudentSampler.sample`'s answer: the same number of
        samples per prompt of ``prompts``, prompt-major) as compact training examples
        (:func:`~kdray.data.examples.sample_examples`, cut at ``max_seq_len``) with each one's
        teacher record in the stored bytes (``n_tokens``, ``topk_ids``, ``topk_logprobs``).

        Returns:
            Those columns (one row per sample), the samples' ``version`` and ``generate_s``, and
            ``score_s``: the teacher's seconds on them.

        Raises:
            DataError: a prompt + sample longer than the teacher's ``max_model_len``.
        """
        examples = sample_examples(prompts, samples["responses"], max_seq_len)
        start = time.perf_counter()
        scored = self.scorer(examples)
        return {**scored, "version": samples["version"], "generate_s": samples["generate_s"],
                "score_s": time.perf_counter() - start}


def live_pool_of(spec: JobSpec) -> Any:
    """The curriculum entry that samples from a live student pool while the workers train, or
    None: ``on_policy`` with ``lmbda > 0``, or ``replay`` with ``sampler: pool``. Its
    ``replicas``, ``num_cpus_per_replica`` and ``num_gpus_per_replica`` size the pool."""
    on_policy, replay = spec.curriculum_of("on_policy"), spec.curriculum_of("replay")
    if on_policy is not None and on_policy.lmbda > 0:
        return on_policy
    if replay is not None and replay.sampler == "pool":
        return replay
    return None


def student_pool_spec(spec: JobSpec) -> GenerationSpec:
    """The pool settings of the live student pool: ``generation``'s engine settings with the
    curriculum's replicas and resources (:func:`live_pool_of`), one device per replica."""
    cfg = live_pool_of(spec)
    gpus = cfg.num_gpus_per_replica if cfg.num_gpus_per_replica is not None else spec.generation.num_gpus_per_replica
    return spec.generation.model_copy(update={"replicas": cfg.replicas, "num_cpus_per_replica": cfg.num_cpus_per_replica,
                                              "num_gpus_per_replica": gpus, "tensor_parallel_size": 1})


def live_teacher_of(spec: JobSpec) -> bool:
    """Whether a live teacher pool grades the student's samples while the workers train
    (:class:`TeacherScorer`): the on_policy curriculum samples (``lmbda > 0``) and
    ``teacher_signal`` is ``topk``."""
    live = live_pool_of(spec)
    return live is not None and live.kind == "on_policy" and spec.teacher_signal.mode == "topk"


def live_pool_cpus(spec: JobSpec) -> float:
    """The CPUs the live pools hold while the workers train (:func:`live_pool_of`,
    :func:`live_teacher_of`), placement groups' bundles included."""
    live = live_pool_of(spec)
    cpus = live.replicas * live.num_cpus_per_replica if live is not None else 0.0
    if live_teacher_of(spec):
        pool = spec.generation
        cpus += pool.replicas * sum(b["CPU"] for b in engine_placement(pool)["bundles"])
    return cpus


@dataclass
class LivePools:
    """The live pools of a segment (:func:`start_live_pools`): the student pool's actors, the
    teacher pool's (none without ``teacher_signal: topk``) and their placement groups."""

    student: list[Any] = field(default_factory=list)
    teachers: list[Any] = field(default_factory=list)
    groups: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        """Kill every actor and remove the placement groups."""
        import ray
        from ray.util import remove_placement_group

        for actor in self.student + self.teachers:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)


def start_live_pools(spec: JobSpec, *, version: int, teacher_meta: dict[str, Any] | None = None) -> LivePools:
    """Start the pools the spec runs beside its workers, all at once, and wait until every
    engine runs; the caller stops them (:meth:`LivePools.stop`).

    * The student pool (:func:`live_pool_of`): :func:`student_pool_spec`'s replicas of
      :class:`StudentSampler`, on the student's weights of step ``version``.
    * The teacher pool (:func:`live_teacher_of`): ``generation.replicas`` :class:`TeacherScorer`
      actors, each with ``generation``'s resources (a tensor-parallel replica on GPUs in a
      placement group of its own, as the records stage's, :func:`~kdray.pools.placement.engine_placement`),
      answering in the records layout ``teacher_meta``.

    Raises:
        KdrayError: an engine did not start (the model's files, its architecture, its memory),
            as the engine's starter words it; the pools started are stopped.
    """
    import ray

    pools = LivePools()
    if live_pool_of(spec) is not None:
        pool, model = student_pool_spec(spec), spec.student
        check_engine_support(model, pool)
        # The engine in the actor's process on GPUs too: the pushed weights reach it without pickling.
        env = {**pool_env(pool), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        actor = ray.remote(StudentSampler).options(
            num_cpus=pool.num_cpus_per_replica, num_gpus=pool.num_gpus_per_replica, max_restarts=0,
            runtime_env={"env_vars": env})
        pools.student = [actor.remote(
            model.model, dtype=model.dtype, max_model_len=model.max_model_len, enforce_eager=pool.enforce_eager,
            seed=spec.training.seed + i, version=version, env=env, **engine_options(pool))
            for i in range(pool.replicas)]
    if live_teacher_of(spec):
        from kdray.pools.run import pool_class_kwargs

        pool, signal = spec.generation, spec.teacher_signal
        kwargs = dict(**pool_class_kwargs(spec.teacher, pool), mode=signal.mode, k=signal.k, signal_meta=teacher_meta)
        for _ in range(pool.replicas):
            options: dict[str, Any] = dict(num_cpus=pool.num_cpus_per_replica, num_gpus=pool.num_gpus_per_replica)
            if uses_ray_executor(pool):  # vLLM's workers take the group's GPUs
                placement = engine_placement(pool)
                options = dict(num_cpus=placement["bundles"][0]["CPU"], num_gpus=0, **in_placement_group(placement))
                pools.groups.append(options["scheduling_strategy"].placement_group)
            pools.teachers.append(ray.remote(TeacherScorer).options(
                max_restarts=0, runtime_env={"env_vars": kwargs["env"]}, **options).remote(spec.teacher.backend, **kwargs))
    try:
        ray.get([r.ready.remote() for r in pools.student + pools.teachers])
    except ray.exceptions.RayError as error:
        pools.stop()
        cause = getattr(error, "cause", None)
        if isinstance(cause, KdrayError):
            raise cause from None
        raise
    return pools


def push_weights(replicas: list[Any], weights: dict[str, Any], version: int) -> None:
    """Every replica serves ``weights`` as ``version`` once this returns (one copy in the object
    store, read by each replica)."""
    import ray

    ref = ray.put(weights)
    ray.get([r.load_weights.remote(ref, version) for r in replicas])
