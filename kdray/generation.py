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
    #: Generate exactly ``max_new_tokens`` tokens, past EOS (benchmarks; not a spec field).
    ignore_eos: bool = False

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

    Constructed once per actor; ``__call__`` receives a numpy batch with ``_row`` and
    ``prompt`` and returns one row per generated sample. With ``score_gold=True`` the batch
    also carries ``gold_response`` / ``gold_finish_reason``, and each output row gets
    ``gold_ce``: the model's mean token cross-entropy (nats) on that response, scored as
    vLLM prompt log-probs of prompt + response ids, tokenized exactly as the trainer does
    (:func:`kdray.records.encode_batch`). Generation and scoring share one ``generate`` call.
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
        score_gold: bool = False,
        chat_template: str = "auto",
    ):
        for key, value in env.items():
            os.environ.setdefault(key, value)
        from vllm import LLM, SamplingParams

        from kdray.models import resolve_model
        from kdray.records import uses_chat_template

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
            ignore_eos=sampling.ignore_eos,
        )
        self.score_gold = score_gold
        self.chat_template = uses_chat_template(self.llm.get_tokenizer(), chat_template)
        # One token out, and the log-prob of every prompt token (the realized one is always
        # included, whatever the top-k): what scoring a given response needs.
        self.score_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def _score_requests(self, batch: dict[str, np.ndarray]) -> tuple[list[Any], list[int]]:
        from vllm.inputs import TokensPrompt

        from kdray.records import encode_batch

        pairs = encode_batch(self.llm.get_tokenizer(), list(batch["prompt"]), list(batch["gold_response"]),
                             list(batch["gold_finish_reason"]), self.chat_template)
        return [TokensPrompt(prompt_token_ids=p + r) for p, r in pairs], [len(p) for p, _ in pairs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        from kdray.records import prompt_token_ids

        ids = prompt_token_ids(self.llm.get_tokenizer(), [str(p) for p in batch["prompt"]], self.chat_template)
        prompts: list[Any] = [TokensPrompt(prompt_token_ids=p) for p in ids]
        params = [self.params] * len(prompts)
        starts: list[int] = []
        if self.score_gold:
            scoring, starts = self._score_requests(batch)
            prompts += scoring
            params += [self.score_params] * len(scoring)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        n = len(batch["prompt"])
        ce = [_mean_nll(req.prompt_logprobs, req.prompt_token_ids, start)
              for req, start in zip(outputs[n:], starts)]
        out: dict[str, list[Any]] = {k: [] for k in batch}
        out.update(response=[], response_token_ids=[], sample_index=[], finish_reason=[])
        if self.score_gold:
            out["gold_ce"] = []
        for row, request in enumerate(outputs[:n]):
            for j, completion in enumerate(request.outputs):
                for k in batch:
                    out[k].append(batch[k][row])
                out["response"].append(completion.text)
                out["response_token_ids"].append(np.asarray(completion.token_ids, dtype=np.int32))
                out["sample_index"].append(j)
                out["finish_reason"].append(str(completion.finish_reason))
                if self.score_gold:
                    out["gold_ce"].append(ce[row])
        result = {k: np.asarray(v) for k, v in out.items() if k != "response_token_ids"}
        ids = np.empty(len(out["response_token_ids"]), dtype=object)
        ids[:] = out["response_token_ids"]
        result["response_token_ids"] = ids
        return result


def pool_class(backend: str, role: str = "generator") -> type:
    """The Ray Data callable class of a pool backend (``ModelSpec.backend``): the generator,
    or (``role="scorer"``) the teacher scorer of :mod:`kdray.scoring`."""
    if backend not in ("vllm", "hf"):
        raise ValueError(f"unknown generation backend {backend!r}; use 'vllm' or 'hf'")
    if backend == "hf":
        from kdray import generation_hf

        return generation_hf.HFScorer if role == "scorer" else generation_hf.HFGenerator
    if role == "scorer":
        from kdray.scoring import VLLMScorer

        return VLLMScorer
    return VLLMGenerator


def generator_class(backend: str) -> type:
    """The generator class of a pool backend (what :func:`generate` maps the rows with)."""
    return pool_class(backend)


def _mean_nll(prompt_logprobs: list[Any], token_ids: list[int], start: int) -> float:
    """Mean −log p of ``token_ids[start:]`` from vLLM's per-position prompt log-probs."""
    values = [prompt_logprobs[i][token_ids[i]].logprob for i in range(start, len(token_ids))]
    return -float(np.mean(values))


def generate(
    rows: list[dict[str, Any]],
    model: ModelSpec,
    pool: GenerationSpec,
    sampling: SamplingConfig,
    *,
    score_gold: bool = False,
    chat_template: str = "auto",
    on_rows: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate responses for ``rows`` on a Ray Data actor pool.

    Returns one dict per generated sample, in the order of ``rows`` (then ``sample_index``):
    ``id``, ``prompt``, ``response``, ``response_token_ids``, ``sample_index``,
    ``finish_reason``, and with ``score_gold`` the model's mean token cross-entropy on each
    row's own ``response`` (``gold_ce``; ``rows`` then need ``response``). Ray Data does not
    keep order, so rows travel with their position. ``on_rows(k)`` is called as each batch
    of k output rows arrives (progress bars).
    """
    import ray
    import ray.data

    items = []
    for i, r in enumerate(rows):
        item = {"_row": i, "id": r["id"], "prompt": r["prompt"]}
        if score_gold:
            item.update(gold_response=r["response"], gold_finish_reason=r.get("finish_reason", "stop"))
        items.append(item)
    ds = ray.data.from_items(items)
    ds = ds.map_batches(
        generator_class(model.backend),
        fn_constructor_kwargs=dict(
            model=model.model,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            tensor_parallel_size=pool.tensor_parallel_size,
            enforce_eager=pool.enforce_eager,
            sampling=sampling,
            env=vllm_env(),
            score_gold=score_gold,
            chat_template=chat_template,
        ),
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.replicas),
        num_cpus=pool.num_cpus_per_replica,
        num_gpus=pool.num_gpus_per_replica,
    )
    results: list[tuple[int, dict[str, Any]]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["id"])
        for i in range(n):
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
            results.append((int(batch["_row"][i]), row))
        if on_rows:
            on_rows(n)
    results.sort(key=lambda item: (item[0], item[1]["sample_index"]))
    return [row for _, row in results]
