"""One run of the ``kdray repro`` grid: train a student by one method and score it.

:func:`train_and_evaluate` is the body of a Ray task (one CPU, one torch thread): it gets
everything through its arguments (a validated JobSpec as JSON, the seed, the shared teacher
responses in their POCL easy → hard order and in their original order, the held-out rows).

It trains with the code a job's Ray Train workers run, in one process and without DeepSpeed:
the plan of segments (:func:`kdray.curriculum.plan.plan_segments`: POCL stages, DistiLLM-2 rounds),
the tokenization (:class:`kdray.data.examples.TokenizeForTraining`), and the one local loop
(:class:`kdray.train.loop.LocalLoop`: the workers' step objective, optimizer, LR schedule and
gradient clipping; DistiLLM-2's schedule state goes from segment to segment as the workers hand
it through checkpoints). What differs from
a job: one process instead of Ray Train workers (micro-batch = global batch, so no gradient
accumulation and no all-reduce), a full random permutation of the rows per epoch instead of
Ray Data's local shuffle buffer, and generation by batched HF ``generate`` instead of a vLLM
pool: DistiLLM-2's on-policy student responses (sampled) before every round and the held-out
answers (greedy) after training.
"""

from __future__ import annotations

import time
from typing import Any


def hf_generate(model: Any, tok: Any, prompts: list[str], *, max_new_tokens: int, encoding: Any,
                temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                batch_size: int = 256) -> list[tuple[str, str]]:
    """(response text, finish reason) per prompt with HF ``generate``: greedy when
    ``temperature`` is 0, else sampled over the whole vocabulary (no top-k, as vLLM's default).

    Prompts become ids under ``encoding`` (the job's :class:`kdray.data.tokenize.PromptEncoding`),
    as in the pools;
    a response ends at the first EOS ("stop") or at ``max_new_tokens`` ("length"), and is
    decoded without special tokens, as vLLM does."""
    import torch

    from kdray.pools.left_padded import generate_left_padded

    ids = encoding.token_ids(tok, prompts)
    torch.manual_seed(seed)
    out: list[tuple[str, str]] = []
    for start in range(0, len(ids), batch_size):
        for (response, finish), in generate_left_padded(
                model, ids[start:start + batch_size], pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id],
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p):
            out.append((tok.decode(response, skip_special_tokens=True), finish))
    return out


def evaluate_model(model: Any, tok: Any, heldout: list[dict[str, Any]], *, max_new_tokens: int,
                   encoding: Any) -> tuple[dict[str, float], list[str]]:
    """Greedy answers to the held-out prompts, scored by :func:`kdray.data.text_scores.score_responses`."""
    from kdray.data.text_scores import score_responses

    was_training = model.training
    model.eval()
    answers = [text for text, _ in hf_generate(model, tok, [r["prompt"] for r in heldout],
                                                max_new_tokens=max_new_tokens, encoding=encoding)]
    model.train(was_training)
    return score_responses(answers, [r["response"] for r in heldout]), answers


def evaluate_reference(model_ref: str, dtype: str, heldout: list[dict[str, Any]], *, max_new_tokens: int,
                       encoding: Any, language_prompts: list[str] | None = None, threads: int = 1) -> dict[str, Any]:
    """Score an untrained model (the teacher, the initial student) as every run is scored: with
    the job's prompt encoding (``encoding``), the teacher's own template or not; with
    ``language_prompts``, against its world's language on them too (``language``:
    :func:`kdray.repro.language.language_scores`, seed 0)."""
    import torch

    from kdray.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(model_ref)
    model = load_causal_lm(model_ref, dtype, trainable=False)
    scores, answers = evaluate_model(model, tok, heldout, max_new_tokens=max_new_tokens, encoding=encoding)
    out = {"scores": scores, "answers": answers}
    if language_prompts:
        from kdray.repro.language import language_scores

        out["language"] = language_scores(model, tok, model_ref, language_prompts)
    return out


def _encode(encoder: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows],
             "finish_reason": [r["finish_reason"] for r in rows]}
    if "student_response" in rows[0]:
        batch["student_response"] = [r["student_response"] for r in rows]
        batch["student_finish_reason"] = [r["student_finish_reason"] for r in rows]
    return encoder(batch)


def train_and_evaluate(spec_json: dict[str, Any], method: str, seed: int, ordered_rows: list[dict[str, Any]],
                       plain_rows: list[dict[str, Any]], heldout: list[dict[str, Any]], *,
                       on_policy_temperature: float, language_prompts: list[str] | None = None,
                       threads: int = 1) -> dict[str, Any]:
    """Train the student of ``spec_json`` (POCL methods on ``ordered_rows``, easy → hard;
    others on ``plain_rows``) with seed ``seed``, then score it on ``heldout`` and, with
    ``language_prompts``, against its world's language on them
    (:func:`kdray.repro.language.language_scores`, sampled with the run's seed).

    The seed sets the data order of every epoch and the sampling of DistiLLM-2's student
    responses (the student's initial weights are the spec's model, the same for every seed).
    Returns the scores (the language's under ``language``), timings and per-step metrics."""
    import numpy as np
    import torch

    from kdray.models import load_causal_lm, load_tokenizer
    from kdray.curriculum.plan import plan_segments, total_steps
    from kdray.data.tokenize import job_encoding
    from kdray.spec import JobSpec
    from kdray.data.examples import CollateExamples, TokenizeForTraining
    from kdray.train.loop import LocalLoop

    torch.set_num_threads(threads)
    started = time.perf_counter()
    spec = JobSpec.model_validate(spec_json)
    t = spec.training
    rows_all = ordered_rows if spec.curriculum_of("pocl") is not None else plain_rows
    plan = plan_segments(spec, len(rows_all))
    n_steps = total_steps(plan)
    tok = load_tokenizer(spec.student.model)
    encoding = job_encoding(spec, check_teacher=False)  # the job's, as its pools and trainer use it
    torch.manual_seed(seed)
    student = load_causal_lm(spec.student.model, spec.student.dtype, trainable=True)
    student.train()
    teacher = load_causal_lm(spec.teacher.model, spec.teacher.dtype, trainable=False)
    encoder = TokenizeForTraining(spec.student.model, t.max_seq_len, encoding)
    collate = CollateExamples(encoder.pad_id)
    rng = np.random.default_rng([seed, 7])
    loop = LocalLoop(spec, student, teacher, total_steps=n_steps, num_segments=len(plan))
    history: list[dict[str, Any]] = []
    generate_s = 0.0
    for seg in plan:
        rows = rows_all[: seg.n_rows]
        if seg.regenerate_student:  # DistiLLM-2's batched on-policy round: the current student answers
            t0 = time.perf_counter()
            student.eval()
            answers = hf_generate(student, tok, [r["prompt"] for r in rows],
                                  max_new_tokens=spec.generation.max_new_tokens, encoding=encoding,
                                  temperature=on_policy_temperature, seed=seed * 1000 + seg.index)
            student.train()
            rows = [dict(r, student_response=a, student_finish_reason=f) for r, (a, f) in zip(rows, answers)]
            generate_s += time.perf_counter() - t0
        arrays = _encode(encoder, rows)  # compact examples
        loop.begin_segment(seg)
        while loop.global_step < seg.end_step:
            perm = rng.permutation(len(rows))
            for i in range(seg.steps_per_epoch):
                index = perm[i * t.global_batch_size:(i + 1) * t.global_batch_size]
                batch = collate({k: v[index] for k, v in arrays.items()})  # padded to its longest row
                history.append(loop.step([batch]))
                if loop.global_step >= seg.end_step:
                    break
        loop.end_segment()
    train_s = time.perf_counter() - started
    t0 = time.perf_counter()
    scores, _ = evaluate_model(student, tok, heldout, max_new_tokens=spec.evaluation.max_new_tokens,
                               encoding=encoding)
    if language_prompts:
        from kdray.repro.language import language_scores

        scores["language"] = language_scores(student, tok, spec.student.model, language_prompts, seed=seed)
    return {"method": method, "seed": seed, **scores, "steps": n_steps, "segments": len(plan),
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "train_s": train_s, "on_policy_generate_s": generate_s, "eval_s": time.perf_counter() - t0,
            "train_metrics": history}
