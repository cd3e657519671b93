"""The vLLM backend of the pools (``backend: vllm``, the default).

Generation (teacher responses, student samples, held-out answers, the judge, POCL's difficulty)
runs on Ray's batch LLM processor (``ray.data.llm``, :func:`generate_requests`): its vLLM
engine stage batches continuously across Ray Data batches and places tensor-parallel workers
in placement groups. kdray adds what the processor has no stage for: the job's own prompt
ids (:class:`EncodeRequests`; the processor's tokenize stage would add special tokens to a
rendered template a second time), ``n`` samples per prompt as requests of their own (the
engine stage keeps one output per request), the finish reason (the stage returns none), and
POCL's scores of a gold response (:func:`response_rows`).

Teacher scoring (``teacher_signal`` ``topk`` or ``hidden``) stays a kdray actor,
:class:`VLLMScorer`, which reads the teacher at the position that predicts each response
token ``j`` (position ``len(prompt) + j - 1``) and keeps only the compact record:

* ``topk``: the k most likely token ids and their log-probs (log-softmax of the raw logits,
  temperature 1), from vLLM's ``prompt_logprobs`` with ``max_logprobs`` raised to k;
* ``hidden``: the teacher's final hidden state (after the final norm: what its lm_head
  multiplies), from vLLM's pooling runner with per-token output and no activation.

Ray's engine stage would hand both on in bulkier forms: every prompt position's log-probs as
Python dicts (with each token's decoded text), pickled between stages; hidden states as
float32 copies of every position, prompt included; and its pooling tasks (embed, classify,
score) have no per-token one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdray.data.light_tasks import map_light
from kdray.data.tokenize import PromptEncoding, encode_batch
from kdray.data.text_scores import rouge_l
from kdray.errors import ModelError, first_line, node
from kdray.models import load_tokenizer, loading, resolve_model, stop_token_ids
from kdray.pools.base import PoolCallable, SamplingConfig, LIGHT_NUM_CPUS, check_lengths, check_score_mode, objects, pool_env
from kdray.pools.placement import engine_placement, uses_ray_executor
from kdray.spec import GenerationSpec, ModelSpec


#: The head sizes vLLM's CPU attention runs (vLLM 0.32, ``CPUAttentionBackend.get_supported_head_sizes()``;
#: tests/test_vllm_requests.py compares the installed vLLM's). With another, a CPU engine starts,
#: then fails at its first request; Ray's batch processor answers that by restarting the engine,
#: ``generation.max_replica_restarts`` times (tests/test_replica_faults.py), each a model load.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _engine_shape(ref: str) -> tuple[int, int | None]:
    """(dimensions of one attention head: ``head_dim``, else hidden_size // num_attention_heads;
    the most tokens its positions cover: ``max_position_embeddings``, or None where the config
    has none or RoPE scaling stretches it, a limit vLLM derives itself) from model ``ref``'s config."""
    from transformers import AutoConfig

    with loading("the config", ref):
        text = AutoConfig.from_pretrained(resolve_model(ref)).get_text_config()
    rope = getattr(text, "rope_scaling", None) or {}
    plain = rope.get("rope_type", rope.get("type", "default")) == "default" and "factor" not in rope
    size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(size), getattr(text, "max_position_embeddings", None) if plain else None


def check_engine_support(model: ModelSpec, pool: GenerationSpec) -> None:
    """Refuse what a vLLM engine of ``pool`` would not run, before it starts (in the driver, and
    in ``kdray validate`` for local models): a ``max_model_len`` over the model's positions
    (``max_position_embeddings``, when no RoPE scaling stretches them: vLLM refuses it), and on
    CPU replicas (``num_gpus_per_replica`` 0) a model whose attention heads are not of a size in
    :data:`CPU_HEAD_SIZES`. The ``hf`` backend passes.

    Raises:
        ModelError: naming the model, what it has, what runs and the fixes.
    """
    if model.backend != "vllm":
        return
    size, limit = _engine_shape(model.model)
    if limit is not None and model.max_model_len > limit:
        raise ModelError(f"max_model_len {model.max_model_len} is over the {limit} positions of model {model.model!r} "
                         f"(its max_position_embeddings), which vLLM refuses: set max_model_len to {limit} or less")
    if pool.num_gpus_per_replica:
        return
    if size not in CPU_HEAD_SIZES:
        raise ModelError(
            f"model {model.model!r} has attention heads of {size} dimensions, which vLLM's CPU attention does not "
            f"run (it runs {', '.join(map(str, CPU_HEAD_SIZES))}): its engine would fail at its first request. "
            "Set backend: hf for this model, give its pool GPUs (num_gpus_per_replica), or use a model whose "
            "head_dim (hidden_size / num_attention_heads) is one of those")


def start_engine(model: str, **kwargs: Any) -> Any:
    """A vLLM engine for ``model``, or a :class:`ModelError` naming the model, the node and what
    vLLM said: its start fails on the model's files, its architecture, or the memory it needs."""
    from vllm import LLM

    try:
        return LLM(model=resolve_model(model), **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError, NotImplementedError) as exc:
        raise ModelError(
            f"vLLM could not start model {model!r} on node {node()} ({first_line(exc)}); check that vLLM supports "
            "its architecture, that its max_model_len fits the model and this node's GPU memory (lower it, or "
            "generation.batch_size), or use backend: hf"
        ) from None


#: The name of the vLLM engine stage in Ray's batch LLM processor (``Processor.get_stage_by_name``).
ENGINE_STAGE = "vLLMEngineStage"
#: Prefixes of the request rows' own columns: every input column travels through Ray's engine
#: stage as ``kdray_in.NAME`` (the stage takes ``prompt`` and other names for itself), and
#: ``kdray_req.*`` says what a request is.
IN, REQ = "kdray_in.", "kdray_req."
#: A request's kind: an answer to the prompt, or a score of the row's gold response.
ANSWER, GOLD = "answer", "gold"


class EncodeRequests:
    """Ray Data callable class, run in light tasks (:func:`kdray.data.light_tasks.map_light`):
    prompt rows → requests for vLLM on Ray's batch LLM processor (:func:`generate_requests`).

    Each input row (``prompt`` and any other columns) becomes ``sampling.n`` *answer* requests:
    ``tokenized_prompt`` (the prompt under the job's :class:`~kdray.data.tokenize.PromptEncoding`,
    int32) and ``sampling_params`` with a per-request seed (``sampling.seed`` + the sample's
    index, so a row's samples differ and every run gives the same ones, however the rows are
    batched). With ``score_gold`` each row also becomes one *gold* request: prompt + the row's
    ``gold_response`` ids (:func:`~kdray.data.tokenize.encode_batch`), one token out and the
    prompt's log-probs, from which :func:`response_rows` takes the model's cross-entropy.

    Raises:
        DataError: a prompt (or prompt + gold response) longer than ``max_model_len``.
    """

    def __init__(self, model: str, *, max_model_len: int, sampling: SamplingConfig, score_gold: bool = False,
                 encoding: PromptEncoding | None = None):
        self.tokenizer = load_tokenizer(model, need_pad=False)
        self.model, self.max_model_len, self.sampling, self.score_gold = model, max_model_len, sampling, score_gold
        self.encoding = encoding if encoding is not None else PromptEncoding.resolve("auto", self.tokenizer,
                                                                                      f"{model}'s")

    def _params(self, sample_index: int) -> dict[str, Any]:
        s = self.sampling
        # With gold requests in the same blocks, answers also ask for their prompt's log-prob
        # (unused): a field holding ints and nulls reaches the engine as floats (Arrow → numpy),
        # which vLLM's request decoder refuses, and the engine then waits forever.
        return dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                    seed=s.seed + sample_index, ignore_eos=s.ignore_eos,
                    prompt_logprobs=0 if self.score_gold else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        ids = self.encoding.token_ids(self.tokenizer, prompts)
        check_lengths([len(p) for p in ids], self.max_model_len, self.model, "prompt")
        # (input row, kind, sample index, token ids, sampling params, where the gold response starts)
        requests = [(r, ANSWER, j, ids[r], self._params(j), 0)
                    for r in range(len(prompts)) for j in range(self.sampling.n)]
        if self.score_gold:
            pairs = encode_batch(self.tokenizer, prompts, list(batch["gold_response"]),
                                 list(batch["gold_finish_reason"]), self.encoding)
            check_lengths([len(p) + len(q) for p, q in pairs], self.max_model_len, self.model, "prompt + response")
            gold = dict(temperature=0.0, top_p=1.0, max_tokens=1, seed=0, ignore_eos=False, prompt_logprobs=0)
            requests += [(r, GOLD, -1, p + q, gold, len(p)) for r, (p, q) in enumerate(pairs)]
        out = {IN + k: objects([v[r] for r, *_ in requests]) if v.dtype == object else v[[r for r, *_ in requests]]
               for k, v in batch.items()}
        out[REQ + "kind"] = np.asarray([kind for _, kind, *_ in requests])
        out[REQ + "sample_index"] = np.asarray([j for _, _, j, *_ in requests], dtype=np.int64)
        out[REQ + "gold_start"] = np.asarray([start for *_, start in requests], dtype=np.int64)
        out["tokenized_prompt"] = objects([np.asarray(t, dtype=np.int32) for _, _, _, t, _, _ in requests])
        out["sampling_params"] = objects([params for *_, params, _ in requests])
        return out


def engine_options(pool: GenerationSpec) -> dict[str, Any]:
    """vLLM engine arguments that only GPU replicas of ``pool`` get, the same for the generator
    and the scorer: the memory share (:meth:`~kdray.spec.GenerationSpec.vllm_gpu_memory_utilization`)
    and, with tensor parallelism, vLLM's Ray executor, whose workers take the GPUs of the
    replica's placement group (:mod:`kdray.pools.placement`). None on CPU replicas."""
    options: dict[str, Any] = {}
    if pool.vllm_gpu_memory_utilization() is not None:
        options["gpu_memory_utilization"] = pool.vllm_gpu_memory_utilization()
    if uses_ray_executor(pool):
        options["distributed_executor_backend"] = "ray"
    return options


def generation_processor(model: ModelSpec, pool: GenerationSpec, seed: int) -> Any:
    """Ray's batch LLM processor (``ray.data.llm``) running ``model`` on vLLM for ``pool``:
    ``pool.replicas`` engines, ``pool.batch_size`` requests per Ray Data batch (vLLM batches
    continuously across them), each replica in a placement group of ``tensor_parallel_size``
    bundles on one node (:func:`~kdray.pools.placement.engine_placement`), with the pool's
    actor environment (:func:`~kdray.pools.base.pool_env`). Its chat-template, tokenize and
    detokenize stages are off: requests come from :class:`EncodeRequests` with the job's own
    prompt ids, and vLLM returns the text.

    The engine stage's actors are restarted at most ``pool.max_replica_restarts`` times. The
    stage answers a fatal engine error by ending its process so that Ray restarts it, and Ray
    Data restarts its actors without limit by default: an error every engine start meets (a
    model the engine cannot run, too little GPU memory) then looped for good. The processor's
    config has no setting for it; its stage's ``map_batches`` arguments take Ray's."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    check_engine_support(model, pool)
    tp = pool.tensor_parallel_size
    config = vLLMEngineProcessorConfig(
        model_source=resolve_model(model.model),
        engine_kwargs=dict(dtype=model.dtype, max_model_len=model.max_model_len, tensor_parallel_size=tp,
                           enforce_eager=pool.enforce_eager, seed=seed, **engine_options(pool)),
        batch_size=pool.batch_size, concurrency=pool.replicas,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        placement_group_config=engine_placement(pool),
        runtime_env={"env_vars": pool_env(pool)},
    )
    light = {"num_cpus": LIGHT_NUM_CPUS}  # the processor's row wrapping: a map each side of the engine
    processor = build_processor(config, preprocess_map_kwargs=light, postprocess_map_kwargs=light)
    processor.get_stage_by_name(ENGINE_STAGE).map_batches_kwargs["max_restarts"] = pool.max_replica_restarts
    return processor


def response_rows(batch: dict[str, np.ndarray], *, stop_ids: list[int], sampling: SamplingConfig,
                  score_gold: bool, output_prefix: str, progress: Any) -> dict[str, np.ndarray]:
    """The engine's answers as the pools' rows (the contract of
    :meth:`~kdray.pools.base.PoolCallable.sample_rows`): the input row's columns plus
    ``response``, ``response_token_ids`` (int32), ``sample_index`` and ``finish_reason``, each with
    ``output_prefix``. Ray's engine stage returns no finish reason: an answer shorter than
    ``max_new_tokens``, or ending in one of ``stop_ids`` without ``ignore_eos``, stopped;
    any other was cut at the length limit.

    With ``score_gold`` an answer row also gets ``gold_rouge_l`` (against the row's
    ``gold_response``) and a gold request's row ``gold_ce`` (the mean −log p of the gold
    response's tokens, nats), each NaN in the other kind of row, whose ``sample_index`` is -1."""
    kinds = batch[REQ + "kind"]
    n = len(kinds)
    out = {k[len(IN):]: v for k, v in batch.items() if k.startswith(IN)}
    p = output_prefix
    texts, ids, reasons = [], [], []
    rouge, ce = np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        if kinds[i] == GOLD:
            texts.append(""), ids.append(np.zeros(0, dtype=np.int32)), reasons.append("")
            ce[i] = _mean_nll(batch["prompt_logprobs"][i], batch["prompt_token_ids"][i], int(batch[REQ + "gold_start"][i]))
            continue
        tokens = np.asarray(batch["generated_tokens"][i], dtype=np.int32)
        stopped = len(tokens) < sampling.max_new_tokens or (
            not sampling.ignore_eos and len(tokens) > 0 and int(tokens[-1]) in stop_ids)
        texts.append(str(batch["generated_text"][i])), ids.append(tokens), reasons.append("stop" if stopped else "length")
        if score_gold:
            rouge[i] = rouge_l(texts[-1], str(out["gold_response"][i]))
    out.update({f"{p}response": np.asarray(texts, dtype=object), f"{p}response_token_ids": objects(ids),
                f"{p}sample_index": batch[REQ + "sample_index"], f"{p}finish_reason": np.asarray(reasons, dtype=object)})
    if score_gold:
        out["gold_rouge_l"], out["gold_ce"] = rouge, ce
    if progress is not None:
        progress.record.remote({"rows": int(np.sum(kinds == ANSWER))})
    return out


def generate_requests(ds: Any, model: ModelSpec, pool: GenerationSpec, sampling: SamplingConfig, *,
                      score_gold: bool = False, encoding: PromptEncoding | None = None, progress: Any = None,
                      output_prefix: str = "") -> Any:
    """``model``'s answers to the rows of the Ray dataset ``ds`` on vLLM, as a lazy dataset:
    :class:`EncodeRequests` (tasks, at most one per replica at once) → Ray's vLLM processor
    (:func:`generation_processor`) → :func:`response_rows` (tasks). See
    :func:`kdray.pools.run.generate_dataset` for the contract."""
    requests = map_light(ds, EncodeRequests, dict(model=model.model, max_model_len=model.max_model_len,
                                                  sampling=sampling, score_gold=score_gold, encoding=encoding),
                         num_cpus=LIGHT_NUM_CPUS, concurrency=pool.replicas, batch_size=pool.batch_size,
                         batch_format="numpy")
    answered = generation_processor(model, pool, sampling.seed)(requests)
    stops = stop_token_ids(load_tokenizer(model.model, need_pad=False), model.model)
    return answered.map_batches(response_rows, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS, fn_kwargs=dict(
        stop_ids=stops, sampling=sampling, score_gold=score_gold, output_prefix=output_prefix, progress=progress))


def _mean_nll(prompt_logprobs: Any, token_ids: Any, start: int) -> float:
    """Mean −log p of ``token_ids[start:]`` from the engine's per-position prompt log-probs (one
    ``{token id: {"logprob": …}}`` per position; the realised token is always there)."""
    values = []
    for i in range(start, len(token_ids)):
        entries = prompt_logprobs[i]
        entry = entries.get(int(token_ids[i]), entries.get(str(int(token_ids[i]))))
        values.append(entry["logprob"])
    return -float(np.mean(values))


class VLLMScorer(PoolCallable):
    """Ray Data callable class holding one vLLM engine that scores prompt + response ids.

    ``__call__`` takes a numpy batch of compact examples (``input_ids``, ``prompt_len``) and
    returns it with, per row of ``R`` response tokens, ``topk_ids`` (int32 ``[R, k]``) and
    ``topk_logprobs`` (float32 ``[R, k]``, descending), or ``hidden`` (float32 ``[R, H]``);
    stored bytes with ``signal_meta`` (:meth:`~kdray.pools.base.PoolCallable.scored_rows`).
    """

    def __init__(self, model: str, *, mode: str, k: int, dtype: str, max_model_len: int,
                 tensor_parallel_size: int, enforce_eager: bool, env: dict[str, str],
                 signal_meta: dict[str, Any] | None = None, progress: Any = None, **engine: Any):
        check_score_mode(mode)
        super().__init__(env, progress)
        self.signal_meta = signal_meta
        from vllm import SamplingParams

        self.mode, self.k, self.model, self.max_model_len = mode, k, model, max_model_len
        # engine: what GPU replicas add (engine_options), through kdray.pools.run.map_pool
        common = dict(dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                      enforce_eager=enforce_eager, **engine)
        if mode == "topk":
            self.llm = start_engine(model, **common, max_logprobs=k)
            # One token out (vLLM must generate one); the prompt's top-k log-probs are the point.
            self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        else:
            from vllm.config import PoolerConfig

            self.llm = start_engine(model, **common, runner="pooling", pooler_config=PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False))

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        pairs = self.example_pairs(batch)
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        check_lengths([len(p) + len(r) for p, r in pairs], self.max_model_len, self.model, "prompt + response")
        requests = [TokensPrompt(prompt_token_ids=p + r) for p, r in pairs]
        if self.mode == "topk":
            results = self.llm.generate(requests, self.params, use_tqdm=False)
            tops = [_topk_rows(res.prompt_logprobs, len(p), len(r), self.k)
                    for res, p, r in zip(results, prompts, responses)]
            return self.scored_rows(batch, {"topk_ids": [ids for ids, _ in tops],
                                            "topk_logprobs": [lps for _, lps in tops]})
        results = self.llm.encode(requests, pooling_task="token_embed", use_tqdm=False)
        hidden = []
        for res, p, r in zip(results, prompts, responses):
            states = res.outputs.data.float().cpu().numpy()  # [len(p) + len(r), H]
            hidden.append(np.ascontiguousarray(states[len(p) - 1: len(p) + len(r) - 1], dtype=np.float32))
        return self.scored_rows(batch, {"hidden": hidden})


def _topk_rows(prompt_logprobs: list[Any], n_prompt: int, n_response: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (ids, log-probs) at each response position from vLLM's prompt log-probs.

    vLLM adds the realised token to each position's dict when it is not in the top k; its
    ``rank`` says so, and it is dropped here (a record holds exactly the k best)."""
    ids = np.zeros((n_response, k), dtype=np.int32)
    lps = np.full((n_response, k), -np.inf, dtype=np.float32)
    for j in range(n_response):
        entries = prompt_logprobs[n_prompt + j]
        best = sorted(((lp.logprob, tok) for tok, lp in entries.items() if lp.rank is None or lp.rank <= k),
                      reverse=True)[:k]
        for slot, (value, tok) in enumerate(best):
            ids[j, slot], lps[j, slot] = tok, value
    return ids, lps
