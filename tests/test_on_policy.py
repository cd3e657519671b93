"""On-policy distillation's parts (issue 20): the spec, the per-step decision, the weights the
trainers push (ZeRO-3 partitioned, LoRA merged), and the live student pool, whose greedy answers
after a push are HF ``generate``'s with the pushed weights. The job end to end is in
tests/test_e2e_on_policy.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdray.spec import parse_spec
from kdray.train.on_policy import on_policy_step
from tests.ranks import run_ranks
from tests.specs import errors_of, minimal


def on_policy(curriculum: dict | None = None, **overrides) -> dict:
    return minimal(curriculum={"kind": "on_policy", **(curriculum or {})}, **overrides)


def test_the_spec_takes_gkds_names_and_refuses_what_cannot_compose():
    spec = parse_spec(on_policy({"lmbda": 1.0, "max_staleness": 1, "sync_every_steps": 2}))
    cfg = spec.curriculum_of("on_policy")
    assert (cfg.lmbda, cfg.max_staleness, cfg.sync_every_steps, cfg.samples_per_prompt) == (1.0, 1, 2, 1)
    assert parse_spec(on_policy()).curriculum_of("on_policy").lmbda == 0.5  # TRL's GKD default

    errors = errors_of(on_policy({"lmbda": 1.5, "max_staleness": 2}))
    assert set(errors) == {"curriculum[0].lmbda", "curriculum[0].max_staleness"}
    message = " ".join(errors_of(minimal(curriculum=[{"kind": "on_policy"}, {"kind": "replay"}])).values())
    assert "on_policy and replay" in message and "keep one" in message
    message = " ".join(errors_of(on_policy({"samples_per_prompt": 3},
                                           training={"micro_batch_size_per_worker": 4})).values())
    assert "samples_per_prompt (3) must divide" in message and "micro_batch_size_per_worker (4)" in message
    message = " ".join(errors_of(on_policy(teacher_signal={"mode": "hidden"})).values())
    assert "teacher_signal.mode 'hidden' cannot serve the on_policy curriculum" in message
    assert "use teacher_signal.mode: topk or online" in message
    message = " ".join(errors_of(on_policy(teacher_signal={"mode": "topk"}, objective={"kind": "reverse_kl",
                                                                                       "kd_temperature": 2.0})).values())
    assert "kd_temperature" in message and "use teacher_signal.mode: online" in message and "hidden, which" not in message


def test_a_top_k_teacher_pool_grades_the_samples_and_records_are_scored_only_for_data_set_steps():
    from kdray.pipeline.budget import storage_plan
    from kdray.pools.live import live_pool_cpus, live_teacher_of

    half = parse_spec(on_policy({"lmbda": 0.5, "num_cpus_per_replica": 0.5}, teacher_signal={"mode": "topk"},
                                generation={"replicas": 2, "num_cpus_per_replica": 0.25}))
    assert live_teacher_of(half) and half.scores_records  # half the steps train on the records
    assert live_pool_cpus(half) == 0.5 + 2 * 0.25  # the student pool's and the teacher pool's
    every = half.model_copy(update={"curriculum": [half.curriculum[0].model_copy(update={"lmbda": 1.0})]})
    assert live_teacher_of(every) and not every.scores_records  # every step on samples: no records stage
    names = [s.name for s in storage_plan(every, 1000, teacher_vocab=512, teacher_hidden=64, n_heldout=0)]
    assert not any("records" in n for n in names)
    assert any("records" in s.name for s in storage_plan(half, 1000, teacher_vocab=512, teacher_hidden=64, n_heldout=0))
    online = parse_spec(on_policy({"lmbda": 1.0}))
    assert not live_teacher_of(online) and not online.scores_records
    assert not live_teacher_of(parse_spec(on_policy({"lmbda": 0.0}, teacher_signal={"mode": "topk"})))


def test_the_live_pool_serves_on_policy_with_lmbda_or_replay_with_sampler_pool():
    from kdray.pools.live import live_pool_of, student_pool_spec

    assert live_pool_of(parse_spec(on_policy({"lmbda": 0.0}))) is None  # plain distillation: no pool
    assert live_pool_of(parse_spec(on_policy({"lmbda": 0.5}))).kind == "on_policy"
    replay = parse_spec(minimal(curriculum={"kind": "replay"}))
    assert replay.curriculum_of("replay").sampler == "worker" and live_pool_of(replay) is None  # DistiLLM's way
    pooled = parse_spec(minimal(curriculum={"kind": "replay", "sampler": "pool", "replicas": 2,
                                            "num_cpus_per_replica": 0.25}))
    assert live_pool_of(pooled).kind == "replay"
    pool = student_pool_spec(pooled)
    assert (pool.replicas, pool.num_cpus_per_replica, pool.tensor_parallel_size) == (2, 0.25, 1)
    assert set(errors_of(minimal(curriculum={"kind": "replay", "sampler": "vllm", "replicas": 0}))) == {
        "curriculum[0].sampler", "curriculum[0].replicas"}
    message = " ".join(errors_of(minimal(curriculum={"kind": "replay", "replicas": 3})).values())
    assert "replay.replicas sizes the live student pool, which only sampler: pool starts" in message
    assert "set sampler: pool or remove replicas" in message


def test_the_step_decision_is_seeded_per_step_and_takes_lmbda_of_the_steps():
    draws = [on_policy_step(7, k, 0.3) for k in range(1, 2001)]
    assert draws == [on_policy_step(7, k, 0.3) for k in range(1, 2001)]  # every rank, every run
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert draws != [on_policy_step(8, k, 0.3) for k in range(1, 2001)]  # the seed matters
    assert all(on_policy_step(7, k, 1.0) for k in range(1, 200))
    assert not any(on_policy_step(7, k, 0.0) for k in range(1, 200))


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _gather_rank(rank: int, zero_stage: int) -> dict:
    """A rank of a 2-rank DeepSpeed engine of the LoRA student, its adapters moved off their
    zero init the same way on both ranks; rank 0 returns what it would push and what the
    student's merged weights were before DeepSpeed partitioned them."""
    import os

    from kdray.ray_setup import job_env
    from kdray.train.on_policy import gathered_weights
    from kdray.train.setup import deepspeed_config, load_student, merged_state_dict, training_deepspeed

    os.environ.update(job_env(), LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    spec = parse_spec(minimal(student={"model": "toy:student", "dtype": "float32"}, training={
        "num_workers": 2, "global_batch_size": 8, "micro_batch_size_per_worker": 4, "zero_stage": zero_stage,
        "lora": LORA}))
    model = load_student(spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    expected = merged_state_dict(model)
    config = deepspeed_config(spec)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = training_deepspeed().initialize(model=model, optimizer=optimizer, config=config)
    if zero_stage == 3:
        assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned: nothing whole here
    got = gathered_weights(engine, zero3=zero_stage == 3, rank=rank)
    assert (got is None) == (rank != 0)
    if got is None:
        return None
    from kdray.models import load_causal_lm

    base = load_causal_lm("toy:student", "float32", trainable=False).state_dict()
    return {"keys": sorted(got), "expected_keys": sorted(expected),
            "unequal": [k for k in got if not torch.equal(got[k], expected[k])],
            "adapted": sorted(k for k in got if not torch.equal(got[k], base[k]))}


def _gather_zero3(rank: int) -> dict:
    return _gather_rank(rank, 3)


def test_the_pushed_weights_are_the_whole_merged_student_under_zero3(tmp_path, toy_world):
    """Every tensor partitioned, LoRA adapters merged. (Under ZeRO-2 each rank holds the whole
    parameters: the on-policy job of tests/test_e2e_on_policy.py pushes them.)"""
    out = run_ranks(_gather_zero3, tmp_path)  # rank 0 compares (tensors do not travel back well)
    assert out["keys"] == out["expected_keys"] and not any("lora" in k for k in out["keys"])
    assert out["unequal"] == []
    assert out["adapted"] and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in out["adapted"])


def _hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=stop_ids[0])
            out.append(ids[0, len(p):].tolist())
    return out


#: The top-k records layout the live teacher pool answers in (the hf backend's scorer: vLLM's
#: top-k scoring is checked against HF in tests/test_e2e_signal.py, and a third engine start
#: would cost CI half a minute).
TEACHER_K = 8


@pytest.fixture(scope="module")
def live_pools(ray_cpus, toy_world):
    """A student pool (vLLM) and a top-k teacher pool (hf), started together."""
    from kdray.data.records import SIGNAL_FORMAT, topk_id_dtype
    from kdray.models import vocab_size
    from kdray.pools.live import start_live_pools

    spec = parse_spec(on_policy({"lmbda": 1.0, "num_cpus_per_replica": 0.5},
                                student={"model": "toy:student", "dtype": "float32", "max_model_len": 128},
                                teacher={"model": "toy:teacher", "dtype": "float32", "max_model_len": 128,
                                         "backend": "hf"},
                                teacher_signal={"mode": "topk", "k": TEACHER_K},
                                generation={"enforce_eager": True, "max_new_tokens": 16, "num_cpus_per_replica": 0.5},
                                data={"train": "toy:train", "heldout": "toy:heldout", "max_prompt_tokens": 64}))
    vocab = vocab_size("toy:teacher")
    meta = {"format": SIGNAL_FORMAT, "mode": "topk", "teacher": "toy:teacher", "k": TEACHER_K,
            "vocab_size": vocab, "id_dtype": topk_id_dtype(vocab)}
    pools = start_live_pools(spec, version=0, teacher_meta=meta)
    yield pools, meta
    pools.stop()


@pytest.mark.slow
def test_after_a_push_the_pools_greedy_answers_are_hf_generates_with_the_pushed_weights(live_pools, toy_world):
    import ray

    from kdray.models import load_causal_lm, load_tokenizer, stop_token_ids
    from kdray.pools.base import SamplingConfig
    from kdray.pools.live import push_weights
    from kdray.train.setup import merged_state_dict

    pool = live_pools[0].student
    assert len(pool) == 1 and len(live_pools[0].teachers) == 1
    tok = load_tokenizer("toy:student", need_pad=False)
    stops = stop_token_ids(tok, "toy:student")
    prompts = [tok(r["prompt"]).input_ids for r in toy_world.rows("heldout")[:8]]
    greedy = SamplingConfig.greedy(12)
    model = load_causal_lm("toy:student", "float32", trainable=False)
    before = ray.get(pool[0].sample.remote(prompts, greedy))
    assert before["version"] == 0 and before["generate_s"] > 0
    assert before["responses"] == _hf_greedy(model, prompts, 12, stops)
    # A stopped answer keeps its stop token (as the data set's responses do); a cut one has 12.
    for ids, reason in zip(before["responses"], before["finish_reasons"]):
        assert (reason == "stop" and ids[-1] in stops) or (reason == "length" and len(ids) == 12)

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights a few optimizer steps could have made
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3 * p.std())
    push_weights(pool, merged_state_dict(model), 7)
    after = ray.get(pool[0].sample.remote(prompts, greedy))
    assert after["version"] == 7
    assert after["responses"] == _hf_greedy(model, prompts, 12, stops)
    assert after["responses"] != before["responses"]

    # Samples: each request seeded apart, the same seeds the same samples.
    sampled = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=6, n=4, seed=11)
    first = ray.get(pool[0].sample.remote(prompts[:2], sampled))
    assert len(first["responses"]) == 8
    assert len({tuple(r) for r in first["responses"][:4]}) > 1
    assert ray.get(pool[0].sample.remote(prompts[:2], sampled))["responses"] == first["responses"]


@pytest.mark.slow
def test_the_teacher_pool_returns_the_samples_as_examples_with_the_teachers_top_k(live_pools, toy_world):
    """A worker's chained call (student replica → teacher replica) returns its samples as the
    trainer's compact examples, cut at max_seq_len, with the teacher's top-k records of exactly
    their labels, equal to a plain HF forward of the teacher; collated, they are the batch the
    objective reads."""
    import numpy as np
    import ray

    from kdray.data.examples import CollateExamples
    from kdray.data.records import decode_signal
    from kdray.models import load_causal_lm, load_tokenizer
    from kdray.pools.base import SamplingConfig

    pools, meta = live_pools
    k = TEACHER_K
    tok = load_tokenizer("toy:student")
    prompts = [tok(r["prompt"]).input_ids for r in toy_world.rows("heldout")[:3]]
    sampled = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=12, n=2, seed=5)
    samples = pools.student[0].sample.remote(prompts, sampled)
    responses = ray.get(samples)["responses"]
    max_seq_len = max(len(prompts[i // 2]) + len(r) for i, r in enumerate(responses)) - 2  # the longest are cut
    out = ray.get(pools.teachers[0].score.remote(prompts, samples, max_seq_len))
    assert out["version"] == ray.get(samples)["version"] and out["score_s"] > 0 and out["generate_s"] > 0
    teacher = load_causal_lm("toy:teacher", "float32", trainable=False)
    assert len(out["input_ids"]) == 6
    cut = 0
    for i, (ids, start) in enumerate(zip(out["input_ids"], out["prompt_len"])):
        prompt, response = prompts[i // 2], responses[i]
        assert list(ids) == (prompt + response)[:max_seq_len] and start == min(len(prompt), len(ids))
        cut += len(prompt) + len(response) > max_seq_len
        record = decode_signal({c: out[c][i] for c in ("n_tokens", "topk_ids", "topk_logprobs")}, meta)
        assert record["topk_ids"].shape == (len(ids) - start, k)
        with torch.no_grad():
            logp = teacher(input_ids=torch.as_tensor([list(ids)])).logits[0, start - 1: len(ids) - 1].log_softmax(-1)
        assert np.allclose(record["topk_logprobs"], logp.topk(k).values.numpy(), rtol=2e-3, atol=2e-3)
        assert np.allclose(logp.gather(1, torch.as_tensor(record["topk_ids"].astype(np.int64))).numpy(),
                           record["topk_logprobs"], rtol=2e-3, atol=2e-3)
    assert cut > 0  # some samples were cut at max_seq_len, their records with them
    batch = CollateExamples(tok.pad_token_id, meta)(out)
    labelled = (batch["labels"][:, 1:] != -100)
    assert batch["t_topk_ids"].shape[:2] == batch["input_ids"].shape and batch["t_topk_ids"].shape[2] == k
    assert int(labelled.sum()) == int(sum(out["n_tokens"]))


def test_the_on_policy_bench_weighs_tokens_and_idle_time_by_each_steps_wall_time():
    from kdray.bench.onpolicy import job_spec, summarize, table

    steps = [{"step": 1, "loss": 5.0, "step_s": 9.0, "tokens_per_s": 10.0, "sampling_s": 8.0},  # start-up: left out
             {"step": 2, "loss": 5.0, "step_s": 9.0, "tokens_per_s": 10.0, "sampling_s": 8.0},
             {"step": 3, "loss": 4.0, "step_s": 1.0, "tokens_per_s": 300.0, "sampling_s": 0.25, "weight_sync_s": 0.25,
              "staleness": 1},
             {"step": 4, "loss": 4.0, "step_s": 3.0, "tokens_per_s": 100.0, "sampling_s": 0.5, "staleness": 0}]
    report = {"train_metrics": steps, "evaluation": {"student_after": {"rougeL": 0.4, "exact_match": 0.25}}}
    got = summarize(report)
    assert got["steps"] == 2 and got["tokens_per_s"] == pytest.approx(600 / 4)  # 300 + 300 tokens in 4 s
    assert got["idle_share"] == pytest.approx(1.0 / 4) and got["max_staleness_seen"] == 1
    assert "on-policy sync" in table({"on-policy sync": {"status": "ok", **got}})
    # The three variants are valid jobs of the same steps and seed, differing in their curriculum only.
    specs = {v: parse_spec(job_spec(Path("o"), v, steps=8, heldout=16))
             for v in ("replay-hf", "on-policy sync", "on-policy overlapped")}
    assert {s.curriculum[0].kind for s in specs.values()} == {"replay", "on_policy"}
    assert specs["on-policy overlapped"].curriculum_of("on_policy").max_staleness == 1
    assert len({s.training.model_dump_json() for s in specs.values()}) == 1
