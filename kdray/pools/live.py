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
"""

from __future__ import annotations

import time
from typing import Any

from kdray.errors import KdrayError
from kdray.models import load_tokenizer, stop_token_ids
from kdray.pools.base import PoolCallable, SamplingConfig, check_lengths, pool_env
from kdray.pools.vllm import engine_options, start_engine
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


def start_student_pool(spec: JobSpec, *, version: int) -> list[Any]:
    """Start the student pool's replicas (Ray actors) on the student's
    starting weights and wait until every engine runs; the caller kills them
    (:func:`stop_student_pool`).

    Raises:
        KdrayError: an engine did not start (the model's files, its architecture, its memory),
            as :func:`~kdray.pools.vllm.start_engine` words it.
    """
    import ray

    pool = student_pool_spec(spec)
    model = spec.student
    # The engine in the actor's process on GPUs too: the pushed weights reach it without pickling.
    env = {**pool_env(pool), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    actor = ray.remote(StudentSampler).options(
        num_cpus=pool.num_cpus_per_replica, num_gpus=pool.num_gpus_per_replica, max_restarts=0,
        runtime_env={"env_vars": env})
    replicas = [actor.remote(
        model.model, dtype=model.dtype, max_model_len=model.max_model_len, enforce_eager=pool.enforce_eager,
        seed=spec.training.seed + i, version=version, env=env, **engine_options(pool))
        for i in range(pool.replicas)]
    try:
        ray.get([r.ready.remote() for r in replicas])
    except ray.exceptions.RayError as error:
        stop_student_pool(replicas)
        cause = getattr(error, "cause", None)
        if isinstance(cause, KdrayError):
            raise cause from None
        raise
    return replicas


def stop_student_pool(replicas: list[Any]) -> None:
    import ray

    for replica in replicas:
        ray.kill(replica)


def push_weights(replicas: list[Any], weights: dict[str, Any], version: int) -> None:
    """Every replica serves ``weights`` as ``version`` once this returns (one copy in the object
    store, read by each replica)."""
    import ray

    ref = ray.put(weights)
    ray.get([r.load_weights.remote(ref, version) for r in replicas])
