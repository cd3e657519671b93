"""Running a pool over rows: Ray Data ``map_batches`` on an actor pool sized by the spec.

:func:`generate` answers prompts with a model's generator; :func:`score_teacher` records the
teacher's signal on the training responses with its scorer. Both size the actor pool from
``generation`` (replicas, GPUs and CPUs per replica, batch size) through :func:`map_pool`, and
return rows in the order they were given: Ray Data does not keep order, so every row travels
with its position ``_row``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kdray.data.tokenize import PromptEncoding, encode_batch, job_encoding
from kdray.errors import KdrayError
from kdray.models import load_tokenizer
from kdray.pools import hf, vllm
from kdray.pools.base import BACKENDS, ROLES, SamplingConfig, pool_env
from kdray.spec import GenerationSpec, JobSpec, ModelSpec


def pool_class(backend: str, role: str = "generator") -> type:
    """The Ray Data callable class of a pool backend (``ModelSpec.backend``) and role."""
    if backend not in BACKENDS or role not in ROLES:
        raise ValueError(f"unknown pool {backend!r}/{role!r}; backends {BACKENDS}, roles {ROLES}")
    if backend == "hf":
        return hf.HFScorer if role == "scorer" else hf.HFGenerator
    return vllm.VLLMScorer if role == "scorer" else vllm.VLLMGenerator


def map_pool(items: list[dict[str, Any]], model: ModelSpec, pool: GenerationSpec, role: str, *,
             pool_cls: type | None = None, **kwargs: Any) -> Any:
    """A Ray Data dataset of ``items`` mapped by ``model``'s pool class for ``role``
    (:func:`pool_class`, or ``pool_cls``: a subclass of it, as the generation
    bench passes to time start-up) on ``pool.replicas`` actors; ``kwargs`` go to the class's
    constructor with the model, dtype, lengths, parallelism and environment."""
    import ray.data

    return ray.data.from_items(items).map_batches(
        pool_cls or pool_class(model.backend, role),
        fn_constructor_kwargs=dict(
            model=model.model,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            tensor_parallel_size=pool.tensor_parallel_size,
            enforce_eager=pool.enforce_eager,
            env=pool_env(pool),
            **kwargs,
        ),
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.replicas),
        num_cpus=pool.num_cpus_per_replica,
        num_gpus=pool.num_gpus_per_replica,
    )


def generate(
    rows: list[dict[str, Any]],
    model: ModelSpec,
    pool: GenerationSpec,
    sampling: SamplingConfig,
    *,
    score_gold: bool = False,
    encoding: PromptEncoding | None = None,
    on_rows: Callable[[int], None] | None = None,
    pool_cls: type | None = None,
) -> list[dict[str, Any]]:
    """Generate responses for ``rows`` (each with ``id`` and ``prompt``) on a Ray Data actor pool.

    Returns:
        One dict per generated sample, in the order of ``rows`` (then ``sample_index``):
        ``id``, ``prompt``, ``response``, ``response_token_ids``, ``sample_index``,
        ``finish_reason``, and with ``score_gold`` the model's mean token cross-entropy (nats)
        on each row's own ``response`` (``gold_ce``) and the ROUGE-L of each sample against it
        (``gold_rouge_l``; ``rows`` then need ``response`` and
        ``finish_reason``). ``on_rows(k)`` is called as each batch of k output rows arrives;
        ``pool_cls`` replaces the backend's generator class (:func:`map_pool`).

    Prompts are encoded with ``encoding``: a job passes its own
    (:meth:`kdray.stages.context.StageContext.prompt_encoding`) for every model it runs; None
    lets the model use its own chat template (benchmarks, direct use).
    """
    items = []
    for i, r in enumerate(rows):
        item = {"_row": i, "id": r["id"], "prompt": r["prompt"]}
        if score_gold:
            item.update(gold_response=r["response"], gold_finish_reason=r["finish_reason"])
        items.append(item)
    ds = map_pool(items, model, pool, "generator", pool_cls=pool_cls, sampling=sampling, score_gold=score_gold,
                  encoding=encoding)
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
                row["gold_rouge_l"] = float(batch["gold_rouge_l"][i])
            results.append((int(batch["_row"][i]), row))
        if on_rows:
            on_rows(n)
    results.sort(key=lambda item: (item[0], item[1]["sample_index"]))
    return [row for _, row in results]


def score_teacher(rows: list[dict[str, Any]], spec: JobSpec, *, on_rows: Callable[[int], None] | None = None,
                  encoding: PromptEncoding | None = None) -> list[dict[str, Any]]:
    """Score every training row's response with the teacher's scorer pool, in row order.

    The ids are those of :func:`kdray.data.tokenize.encode_batch` under the job's prompt encoding
    (``encoding``, or :func:`kdray.data.tokenize.job_encoding` of ``spec``: the same), cut at
    ``training.max_seq_len`` as the trainer cuts them, so the records line up with its labels.

    Args:
        rows: training rows with ``prompt``, ``response`` and ``finish_reason`` (and
            ``response_token_ids`` where a pool generated the response).
        spec: the job; ``teacher_signal`` says what to record.

    Returns:
        Per row ``{"n_tokens", "topk_ids" [R, k] int32, "topk_logprobs" [R, k] float32}`` or
        ``{"n_tokens", "hidden" [R, H] float32}``, with ``R`` the row's response tokens.

    Raises:
        KdrayError: the pool returned no score for some rows.
    """
    signal = spec.teacher_signal
    tok = load_tokenizer(spec.student.model)
    if encoding is None:
        encoding = job_encoding(spec, check_teacher=False)
    pairs = encode_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                         [r["finish_reason"] for r in rows], encoding,
                         [r.get("response_token_ids") for r in rows])  # the trainer's ids (encode_batch)
    limit = spec.training.max_seq_len
    items = []
    for i, (p, r) in enumerate(pairs):
        r = r[: max(0, limit - len(p))]  # the trainer cuts sequences at max_seq_len too
        items.append({"_row": i, "prompt_ids": np.asarray(p, dtype=np.int32),
                      "response_ids": np.asarray(r, dtype=np.int32)})
    ds = map_pool(items, spec.teacher, spec.generation, "scorer", mode=signal.mode, k=signal.k)
    keys = ("topk_ids", "topk_logprobs") if signal.mode == "topk" else ("hidden",)
    results: list[dict[str, Any] | None] = [None] * len(items)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["_row"])):
            record = {key: np.asarray(batch[key][i]) for key in keys}
            record["n_tokens"] = len(batch["response_ids"][i])
            results[int(batch["_row"][i])] = record
        if on_rows:
            on_rows(len(batch["_row"]))
    missing = [rows[i]["id"] for i, r in enumerate(results) if r is None]
    if missing:
        raise KdrayError(f"the teacher pool ({spec.teacher.model}) returned no score for {len(missing)} rows "
                         f"(first ids: {missing[:5]}); see the Ray Data actor logs for why, then run the job again")
    return results  # type: ignore[return-value]
