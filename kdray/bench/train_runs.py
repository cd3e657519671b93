"""How ``kdray bench train`` (:mod:`kdray.bench.train`) measures a run: the allocator every
measured process runs with, a run's step-time parts, and the bare loop -- the job's training
without Ray or DeepSpeed, one process, plain torch (:class:`kdray.train.loop.LocalLoop`, the
one local loop), in a subprocess of its own per thread count (``python -m
kdray.bench.train_runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The jobs' and the bare loop's allocator (their local Ray's workers inherit it): glibc hands
#: buffers of 128 KiB and more straight back to the OS when freed, so a peak is what was in use,
#: not what a fragmented heap kept (ZeRO-3 gathers and frees a layer's weights per module).
MEASURED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def error_line(text: str) -> str:
    """A failed run's message: its ``error:`` line (kdray's one-line user error), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else "no output"


def step_time_parts(steps: list[dict[str, Any]]) -> dict[str, float | None]:
    """The mean over ``steps`` of each part of a step's time (:class:`kdray.train.step.StepClock`,
    the metrics' ``*_s``; None for a part no step reports): a mean, so the parts that come every
    few steps (the batched reports, checkpoints) count, and the parts add up to the mean step."""
    from kdray.train.step import StepClock

    parts: dict[str, float | None] = {}
    for part in (*StepClock.PARTS, *StepClock.LAPS):  # and the whole step's wall and CPU time
        values = [m[f"{part}_s"] for m in steps if m.get(f"{part}_s") is not None]
        parts[f"{part}_s"] = statistics.fmean(values) if values else None
    return parts


def bare_loop(spec_path: str, skip_steps: int, threads: int) -> dict[str, Any]:
    """The job's training, without Ray or DeepSpeed: one process, plain torch, ``threads``
    intra-op threads."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)

    from kdray.curriculum.plan import plan_segments, total_steps
    from kdray.data.datasets import load_split
    from kdray.data.examples import CollateExamples, TokenizeForTraining
    from kdray.data.tokenize import prompt_token_ids, uses_chat_template
    from kdray.models import load_causal_lm, load_tokenizer
    from kdray.spec import load_spec
    from kdray.train.loop import LocalLoop
    from kdray.train.teacher import load_teacher
    from kdray.train.setup import peak_rss_mb, reset_peak_rss

    t0 = time.perf_counter()
    spec = load_spec(spec_path)
    t = spec.training
    torch.manual_seed(t.seed)
    tok = load_tokenizer(spec.student.model)
    use_template = uses_chat_template(tok, spec.data.chat_template)
    rows, _ = load_split(spec.data, "train", lambda ps: [len(i) for i in prompt_token_ids(tok, ps, use_template)],
                         need_response=True)
    encoder = TokenizeForTraining(spec.student.model, t.max_seq_len, spec.data.chat_template)
    data = encoder({  # compact examples; each micro-batch is padded to its own longest row, as in a job
        "prompt": np.array([r["prompt"] for r in rows], dtype=object),
        "response": np.array([r["response"] for r in rows], dtype=object),
        "finish_reason": np.array(["stop"] * len(rows), dtype=object),
    })
    collate = CollateExamples(encoder.pad_id)
    student = load_causal_lm(spec.student.model, spec.student.dtype, trainable=True)
    student.train()
    plan = plan_segments(spec, data["input_ids"].shape[0])
    total = total_steps(plan)
    loop = LocalLoop(spec, student, load_teacher(spec), total_steps=total, num_segments=len(plan))
    reset_peak_rss()  # as the workers measure: the peak of training, once the models are loaded
    loop.begin_segment(plan[0])
    micro, accumulate = t.micro_batch_size_per_worker, t.global_batch_size // t.micro_batch_size_per_worker
    n = data["input_ids"].shape[0]
    gen = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    rates, step_losses, history = [], [], []
    startup = None
    loop.clock.lap()  # steps are timed from here, each from the previous one's end
    for _ in range(total):
        micro_batches = []
        for _ in range(accumulate):
            if cursor + micro > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + micro]
            cursor += micro
            with loop.clock.timing("data_wait"):  # a job's workers collate while they wait on Ray Data
                micro_batches.append(collate({k: v[idx.numpy()] for k, v in data.items()}))
        metrics = loop.step(micro_batches)
        metrics.update(loop.clock.lap())  # wall and CPU time from the last step's end, as the job's workers time theirs
        now = time.perf_counter()
        rates.append(metrics["tokens"] / metrics["step_s"])
        step_losses.append(metrics["loss"])
        history.append(metrics)
        if startup is None:
            startup = now - t0
    steady = rates[skip_steps:]
    return {
        **step_time_parts(history[skip_steps:]),
        "sequences_per_step": t.global_batch_size,
        "status": "ok",
        "steps": total,
        "steady_steps": len(steady),
        "tokens_per_s": statistics.median(steady) if steady else float("nan"),
        "startup_s": startup,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        "first_loss": step_losses[0],
        "last_loss": step_losses[-1],
    }


def run_bare(spec_path: Path, out_dir: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The bare loop in its own process (``threads`` torch threads, as OMP_NUM_THREADS too); its
    figures and log under ``out_dir`` (``bare-THREADS.json``, ``.log``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bare-{threads}.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), **MEASURED_MALLOC)
    proc = subprocess.run([sys.executable, "-m", "kdray.bench.train_runs", str(spec_path), str(out), str(args.skip_steps),
                           str(threads)],
                          env=env, capture_output=True, text=True)
    (out_dir / f"bare-{threads}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"status": "failed", "threads": threads, "error": error_line(proc.stderr)}
    return json.loads(out.read_text())


if __name__ == "__main__":  # run_bare's subprocess: SPEC OUT SKIP_STEPS THREADS
    spec, out, skip, threads = sys.argv[1:5]
    Path(out).write_text(json.dumps(bare_loop(spec, int(skip), int(threads))))
