"""``kdray bench onpolicy``: the student's own samples three ways, side by side (issue 20).

One toy job (reverse KL, the teacher online in 2 Ray Train workers under ZeRO-2, every
optimizer step on fresh samples of the current student for its prompts, the same steps and
seed), in three variants, each run with ``kdray run`` in its own subprocess and local Ray:

* **replay-hf**: DistiLLM's replay with φ = 1 (``init_threshold: 1``): every step's samples
  come from HF ``generate`` inside the training step, as DistiLLM does it;
* **on-policy sync**: ``curriculum: {kind: on_policy, lmbda: 1, max_staleness: 0}``: the samples
  come from the live student vLLM pool, which gets the weights after every step, and the
  trainers wait for them (generate → train);
* **on-policy overlapped**: the same with ``max_staleness: 1``: the pool samples step k + 1
  while step k trains.

Per variant: label tokens trained per second over the steady steps (the first two left out:
the data pipeline's and the pool's start), the trainer's idle share (waiting for samples and
for weight pushes, over the steps' wall time: ``sampling_s`` + ``weight_sync_s`` over
``step_s``), and the trained student's held-out ROUGE-L and exact match. Variants run
interleaved over ``--rounds`` (:mod:`kdray.bench.interleave`); the ratios are taken per round.

Usage: ``kdray bench onpolicy [--quick] [--steps 32] [--rounds 1] [--json F] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdray.bench.interleave import HostLoad, add_rounds_option, interleave, median_row, ratio_summary, resolve_rounds
from kdray.report.render import load_report

VARIANTS = ("replay-hf", "on-policy sync", "on-policy overlapped")
#: Steps left out of the steady figures: the first carries the start of the data pipeline and
#: of the pool's first generation.
SKIP_STEPS = 2


def job_spec(out: Path, variant: str, *, steps: int, heldout: int) -> dict[str, Any]:
    """The toy job of ``variant``: ``steps`` optimizer steps of 32 sequences (16 per worker),
    samples of up to 32 tokens at temperature 1, held-out scoring of ``heldout`` prompts."""
    if variant == "replay-hf":  # φ = 1 from the start and a buffer that never fills: always fresh
        curriculum = {"kind": "replay", "init_threshold": 1.0, "capacity": 100_000, "validation_samples": 16,
                      "validate_every_steps": steps}
    else:
        curriculum = {"kind": "on_policy", "lmbda": 1.0, "sync_every_steps": 1,
                      "max_staleness": 0 if variant == "on-policy sync" else 1,
                      "replicas": 1, "num_cpus_per_replica": 0.5}
    return {
        "name": f"bench-onpolicy-{variant.replace(' ', '-')}",
        "output_dir": str(out),
        "teacher": {"model": "toy:teacher", "dtype": "float32", "max_model_len": 128},
        "student": {"model": "toy:student", "dtype": "float32", "max_model_len": 128},
        "data": {"train": "toy:train", "heldout": "toy:heldout", "max_train_samples": steps * 32,
                 "max_heldout_samples": heldout, "max_prompt_tokens": 64, "response_source": "dataset"},
        "generation": {"max_new_tokens": 32, "num_cpus_per_replica": 0.5, "batch_size": 256, "enforce_eager": True},
        "objective": {"kind": "reverse_kl"},
        "curriculum": curriculum,
        "training": {"num_workers": 2, "zero_stage": 2, "lr": 3e-3, "warmup_steps": 2, "global_batch_size": 32,
                     "micro_batch_size_per_worker": 16, "epochs": 1, "max_seq_len": 96},
        "evaluation": {"max_new_tokens": 16},
    }


def summarize(report: dict[str, Any], skip_steps: int = SKIP_STEPS) -> dict[str, Any]:
    """A finished job's figures: steady label tokens per second, the trainer's idle share,
    the held-out scores of the trained student (``report``: its report.json, with its steps:
    :func:`~kdray.report.render.load_report`)."""
    steps = [m for m in report["train_metrics"] if "loss" in m][skip_steps:]
    wall = sum(m["step_s"] for m in steps)
    tokens = sum(m["tokens_per_s"] * m["step_s"] for m in steps)  # tokens_per_s is over step_s
    idle = sum(m.get("sampling_s", 0.0) + m.get("weight_sync_s", 0.0) for m in steps)
    after = report["evaluation"]["student_after"]
    return {"steps": len(steps), "tokens_per_s": tokens / wall if wall else None,
            "idle_share": idle / wall if wall else None, "rouge_l": after["rougeL"],
            "exact_match": after["exact_match"],
            "max_staleness_seen": max((m.get("staleness", 0) for m in steps), default=0)}


def run_variant(root: Path, variant: str, args: argparse.Namespace, round_: int) -> dict[str, Any]:
    import yaml

    out = root / f"{variant.replace(' ', '-')}-{round_}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spec.yaml"
    path.write_text(yaml.safe_dump(job_spec(out / "job", variant, steps=args.steps, heldout=args.heldout)))
    t0 = time.perf_counter()
    with open(out / "run.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "kdray.cli", "run", str(path), "--restart"], cwd=out,
                              stdout=log, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    result = {"variant": variant, "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {**result, "status": "failed", "error": lines[-1] if lines else "no output"}
    return {**result, "status": "ok", **summarize(load_report(out / "job", with_steps=True))}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'variant':<22} {'tokens/s':>9} {'idle':>6} {'ROUGE-L':>8} {'exact':>6} {'staleness':>9}"]
    for variant, r in rows.items():
        if r["status"] != "ok":
            lines.append(f"{variant:<22} failed: {r['error']}")
            continue
        lines.append(f"{variant:<22} {_fmt(r['tokens_per_s'], '9.0f')} {_fmt(r['idle_share'], '6.0%')} "
                     f"{r['rouge_l']:8.3f} {r['exact_match']:6.3f} {r['max_staleness_seen']:>9}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdray bench onpolicy", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 steps, 16 held-out prompts, one round")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default 32; --quick 8)")
    p.add_argument("--heldout", type=int, default=None, help="held-out prompts scored (default 96; --quick 16)")
    add_rounds_option(p, "the three jobs")
    p.add_argument("--out", default=None, help="keep the jobs' output here (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 32)
    args.heldout = args.heldout or (16 if args.quick else 96)
    if args.steps <= SKIP_STEPS:
        raise SystemExit(f"--steps must be above {SKIP_STEPS} (the steps left out of the steady figures)")
    rounds = resolve_rounds(args)
    with tempfile.TemporaryDirectory(prefix="kdray-bench-onpolicy-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        with HostLoad() as load:
            runs = interleave(lambda v, r: run_variant(root, v, args, r), VARIANTS, rounds)
    rows = {v: median_row(runs[v], lambda r: r["status"] == "ok", ["tokens_per_s", "idle_share", "rouge_l",
                                                                   "exact_match"], ["max_staleness_seen"])
            for v in VARIANTS}
    print(f"kdray bench onpolicy: {args.steps} steps of 32 sequences, reverse KL, 2 workers ZeRO-2, "
          f"{args.heldout} held-out prompts; {load}")
    print(table(rows))

    def ratio(a: str, b: str) -> Any:
        return ratio_summary([r.get("tokens_per_s") for r in runs[a]], [r.get("tokens_per_s") for r in runs[b]])

    ratios = {"overlapped / sync": ratio("on-policy overlapped", "on-policy sync"),
              "sync / replay-hf": ratio("on-policy sync", "replay-hf")}
    for name, summary in ratios.items():
        print(f"tokens/s {name}: {summary if summary is not None else '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rounds": rounds, "runs": runs, "rows": rows,
                                               "ratios": {k: (list(v.ratios) if v else None) for k, v in ratios.items()},
                                               "host_load": load.samples}, indent=2, default=str))
    return 0 if all(r["status"] == "ok" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(run())
