"""Generation pools: a vLLM model on a Ray Data actor pool.

One callable class, :class:`VLLMGenerator`, serves both the teacher and the student: Ray Data
runs it with ``map_batches`` on an ``ActorPoolStrategy`` sized by the spec (replicas, GPUs
per replica, fractional CPUs on CPU hosts). Rows in are ``{"id", "prompt", ...}``; rows out
add ``response``, ``response_token_ids`` and ``sample_index`` (0..n-1 for ``n`` samples per
prompt). Ray Data does not keep order, so callers join on ``id``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kdray.spec import GenerationSpec, ModelSpec

#: Environment every vLLM actor gets on CPU hosts: in-process engine (halves start-up), a
#: small KV cache (GiB), and a private compile cache.
VLLM_CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def vllm_env(cache_root: str | None = None) -> dict[str, str]:
    env = dict(VLLM_CPU_ENV)
    env["VLLM_CACHE_ROOT"] = cache_root or os.path.join(
        os.environ.get("KDRAY_CACHE_DIR", os.path.expanduser("~/.cache/kdray")), "vllm"
    )
    return env


@dataclass(frozen=True)
class SamplingConfig:
    """What one generation pass asks for; built from the spec by :meth:`from_spec`."""

    temperature: float
    top_p: float
    max_new_tokens: int
    n: int
    seed: int

    @classmethod
    def from_spec(cls, gen: GenerationSpec, **overrides: Any) -> "SamplingConfig":
        base = dict(
            temperature=gen.sampling_temperature,
            top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens,
            n=gen.n,
            seed=gen.seed,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def greedy(cls, max_new_tokens: int) -> "SamplingConfig":
        return cls(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, n=1, seed=0)


class VLLMGenerator:
    """Ray Data callable class holding one vLLM engine.

    Constructed once per actor; ``__call__`` receives a numpy batch with ``id`` and ``prompt``.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str,
        max_model_len: int,
        tensor_parallel_size: int,
        enforce_eager: bool,
        sampling: SamplingConfig,
        env: dict[str, str],
    ):
        for key, value in env.items():
            os.environ.setdefault(key, value)
        from vllm import LLM, SamplingParams

        from kdray.models import resolve_model

        path = resolve_model(model)
        self.llm = LLM(
            model=path,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            seed=sampling.seed,
        )
        self.params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        out: dict[str, list[Any]] = {k: [] for k in batch}
        out.update(response=[], response_token_ids=[], sample_index=[], finish_reason=[])
        for row, request in enumerate(outputs):
            for j, completion in enumerate(request.outputs):
                for k in batch:
                    out[k].append(batch[k][row])
                out["response"].append(completion.text)
                out["response_token_ids"].append(np.asarray(completion.token_ids, dtype=np.int32))
                out["sample_index"].append(j)
                out["finish_reason"].append(str(completion.finish_reason))
        result = {k: np.asarray(v) for k, v in out.items() if k != "response_token_ids"}
        ids = np.empty(len(out["response_token_ids"]), dtype=object)
        ids[:] = out["response_token_ids"]
        result["response_token_ids"] = ids
        return result


def generate(
    rows: list[dict[str, Any]],
    model: ModelSpec,
    pool: GenerationSpec,
    sampling: SamplingConfig,
    *,
    on_rows: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate responses for ``rows`` on a Ray Data actor pool; returns rows sorted by id.

    ``on_rows(k)`` is called as each batch of k output rows arrives (progress bars).
    """
    import ray
    import ray.data

    columns = {"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows]}
    ds = ray.data.from_items([dict(zip(columns, vals)) for vals in zip(*columns.values())])
    ds = ds.map_batches(
        VLLMGenerator,
        fn_constructor_kwargs=dict(
            model=model.model,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            tensor_parallel_size=pool.tensor_parallel_size,
            enforce_eager=pool.enforce_eager,
            sampling=sampling,
            env=vllm_env(),
        ),
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.replicas),
        num_cpus=pool.num_cpus_per_replica,
        num_gpus=pool.num_gpus_per_replica,
    )
    results: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["id"])
        for i in range(n):
            results.append(
                {
                    "id": str(batch["id"][i]),
                    "prompt": str(batch["prompt"][i]),
                    "response": str(batch["response"][i]),
                    "response_token_ids": [int(t) for t in batch["response_token_ids"][i]],
                    "sample_index": int(batch["sample_index"][i]),
                    "finish_reason": str(batch["finish_reason"][i]),
                }
            )
        if on_rows:
            on_rows(n)
    order = {r["id"]: i for i, r in enumerate(rows)}
    results.sort(key=lambda r: (order[r["id"]], r["sample_index"]))
    return results
