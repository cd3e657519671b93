"""``kdray repro``: run a grid of distillation methods over several seeds and check the
orderings that POCL (arXiv:2506.05695) and DistiLLM-2 (arXiv:2503.07067) report.

The grid: FKL, RKL, JSD, TVD, SKL, SRKL and AKL, each without and with POCL, and DistiLLM-2
in its ``paper`` and ``released_code`` modes, each over ``seeds`` seeds. A full ``kdray run``
job per cell would spend most of its time starting pools and workers, so the harness shares
what does not depend on the method and runs the rest as Ray tasks:

1. once, with the job driver's own code (:mod:`kdray.stages`) in one Ray session: read and
   check the data; the training responses (the teacher's, from the vLLM pool on Ray Data; on
   the grammar world the dataset's own); POCL's difficulty order (the initial student's answers
   through the pool, ROUGE-L and CE fused by reciprocal rank);
2. per method and seed, a Ray task (1 CPU, 1 torch thread; as many at a time as Ray has
   CPUs): train the student in one process with the plan, objectives, schedules and
   tokenization the Ray Train workers use, and score its greedy held-out answers
   (:mod:`kdray.repro.run` says exactly what differs from a job);
3. the teacher and the initial student scored the same way, as references, and the initial
   student's HF answers to the first training prompts compared with its pool answers from the
   difficulty pass (a check that the two generators agree).

Under the default budget (``equal-steps``) every method gets the same number of optimizer
steps: ``epochs`` passes over the training rows. POCL runs its ``pocl_stages`` cumulative
stages as equal shares of those steps (``interval_unit: steps``) with its KD temperature 1 → 2
and ``kd_ratio`` 0.7 → 1.0; DistiLLM-2 runs ``distillm2_rounds`` rounds of
``epochs / distillm2_rounds`` epochs, sampling fresh student responses (temperature
``on_policy_temperature``) before each. ``--budget paper`` gives the released scripts' shapes
instead (:data:`BUDGETS`).

Outputs in ``--out``: ``repro.json`` (every run's scores, timings, per-step metrics and
spec; the shared phases' timings; the size), ``repro.md`` (the two tables and the verdict
lines of :mod:`kdray.repro.tables`), ``events.jsonl`` and ``shared/`` (POCL's difficulty file).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdray.errors import SpecError
from kdray.repro.language import WORLDS, ReproWorld, language_prompts
from kdray.repro.report import write_outputs
from kdray.repro.tables import BASE_LOSSES, DISTILLM2_MODES, POCL_SUFFIX

#: Objective of each base loss (DistiLLM's α = 0.1; SRKL as DistiLLM, without the detach).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "fkl": {"kind": "forward_kl"},
    "rkl": {"kind": "reverse_kl"},
    "jsd": {"kind": "jsd", "beta": 0.5},
    "tvd": {"kind": "tvd"},
    "skl": {"kind": "skew_forward_kl", "alpha": 0.1},
    "srkl": {"kind": "skew_reverse_kl", "alpha": 0.1, "detach_mixture_student": False},
    "akl": {"kind": "adaptive_kl", "mu": 0.5},
}
METHODS: tuple[str, ...] = (
    *[m for base in BASE_LOSSES for m in (base, base + POCL_SUFFIX)],
    *[f"distillm2-{mode}" for mode in DISTILLM2_MODES],
)
#: Runnable with --methods, not in the default grid: DistiLLM-2 with POCL (each stage a round).
EXTRA_METHODS: tuple[str, ...] = tuple(f"distillm2-{mode}{POCL_SUFFIX}" for mode in DISTILLM2_MODES)


#: How the methods' training lengths compare. ``equal-steps``: every method ``epochs`` passes
#: worth of optimizer steps (POCL's stages share them equally, DistiLLM-2's rounds split the
#: epochs). ``paper``: the released scripts' shapes: POCL's stages :func:`pocl_paper_stage_epochs`
#: epochs each over their cumulative rows (github.com/liuliuyuan6/POCL scripts/gpt2/pocl/*: 8 per
#: stage, 20 for the KD baseline), DistiLLM-2's rounds one epoch each (num_train_epochs 1 in
#: training_configs/qwen2-1.5b-distillm2.yaml, read in the fork github.com/lyx0727/distillm-2).
BUDGETS: tuple[str, ...] = ("equal-steps", "paper")


def pocl_paper_stage_epochs(epochs: int) -> int:
    """POCL's epochs per stage under the ``paper`` budget: the scripts' 8 per stage for the KD
    baseline's 20 (0.4 of the base methods' ``epochs``, rounded), at least 1. With 4 stages over
    cumulative quarters that is as many steps as the base methods take when 0.4 × ``epochs`` is
    whole (at the default 4 epochs it rounds to 2: a quarter more)."""
    return max(1, round(epochs * 8 / 20))


@dataclass(frozen=True)
class ReproSize:
    """How big the grid is. ``default``: under 45 minutes on 2 CPU cores; ``quick``: CI."""

    train_rows: int = 2048
    heldout_rows: int = 400
    epochs: int = 4                  # passes over the training rows (base methods); sets every method's steps
    global_batch_size: int = 32
    lr: float = 1e-3                 # 3e-3 (the demo's) first knocks the toy student below its start
    warmup_steps: int = 10
    pocl_stages: int = 4
    distillm2_rounds: int = 4
    seeds: int = 3
    max_new_tokens: int = 32         # teacher responses and on-policy student responses
    eval_max_new_tokens: int = 32
    max_seq_len: int = 96
    on_policy_temperature: float = 1.0
    budget: str = "equal-steps"      # or "paper": :data:`BUDGETS`

    @classmethod
    def default(cls) -> "ReproSize":
        return cls()

    @classmethod
    def quick(cls) -> "ReproSize":
        return cls(train_rows=512, heldout_rows=400, epochs=2, global_batch_size=16, warmup_steps=4,
                   pocl_stages=2, distillm2_rounds=2, seeds=2)

    def check(self) -> None:
        errors = []
        if self.budget not in BUDGETS:
            errors.append(("--budget", f"unknown budget {self.budget!r}; choose from {', '.join(BUDGETS)}"))
        if self.budget == "equal-steps" and self.epochs % self.distillm2_rounds:
            errors.append(("distillm2_rounds", f"epochs ({self.epochs}) must be a multiple of distillm2_rounds "
                                               f"({self.distillm2_rounds}) so DistiLLM-2 gets the same steps"))
        if self.seeds < 1:
            errors.append(("--seeds", f"must be at least 1; got {self.seeds}"))
        if errors:
            raise SpecError(errors, "kdray repro size")


def method_spec(method: str, size: ReproSize, train: str, heldout: str, out: Path,
                n_rows: int | None = None, world: ReproWorld = WORLDS["toy"]) -> dict[str, Any]:
    """The JobSpec (as a dict) that describes ``method`` at ``size`` over ``n_rows`` training
    rows (default ``size.train_rows``; a dataset may hold fewer), with ``world``'s models and
    its training responses (:class:`~kdray.repro.language.ReproWorld`)."""
    if method not in METHODS + EXTRA_METHODS:
        raise SpecError([("--methods", f"unknown method {method!r}; choose from {', '.join(METHODS + EXTRA_METHODS)}")])
    pocl = method.endswith(POCL_SUFFIX)
    base = method.removesuffix(POCL_SUFFIX)
    epochs, curriculum = size.epochs, []
    total = None
    if base.startswith("distillm2-"):
        objective = {"kind": "distillm2", "alpha": 0.1}
        d2 = {"kind": "distillm2", "mode": base.removeprefix("distillm2-")}
        if not pocl:
            d2["rounds"] = size.distillm2_rounds
            epochs = 1 if size.budget == "paper" else size.epochs // size.distillm2_rounds
        curriculum.append(d2)
    else:
        objective = dict(OBJECTIVES[base])
    if pocl and size.budget == "paper":
        curriculum.append({"kind": "pocl", "n_stages": size.pocl_stages, "interval_unit": "epochs",
                           "stage_interval": pocl_paper_stage_epochs(size.epochs)})
        epochs = 1
    elif pocl:
        total = size.epochs * ((n_rows or size.train_rows) // size.global_batch_size)
        curriculum.append({"kind": "pocl", "n_stages": size.pocl_stages, "interval_unit": "steps",
                           "stage_interval": math.ceil(total / size.pocl_stages)})
        epochs = 1
    return {
        "name": "repro-" + method.replace("+", "-").replace("_", "-"),
        "output_dir": str(out / "shared"),
        "teacher": {"model": world.teacher, "dtype": "float32", "max_model_len": 128},
        "student": {"model": world.student, "dtype": "float32", "max_model_len": 128},
        "data": {"train": train, "heldout": heldout, "max_train_samples": size.train_rows,
                 "max_heldout_samples": size.heldout_rows, "max_prompt_tokens": 64,
                 "response_source": world.response_source},
        "generation": {"sampling_temperature": 0.0, "max_new_tokens": size.max_new_tokens, "batch_size": 256,
                       "enforce_eager": True, "replicas": 1, "num_cpus_per_replica": 0.5},
        "objective": objective,
        "curriculum": curriculum,
        "training": {"num_workers": 1, "zero_stage": 0, "lr": size.lr, "warmup_steps": size.warmup_steps,
                     "global_batch_size": size.global_batch_size,
                     "micro_batch_size_per_worker": size.global_batch_size, "epochs": epochs,
                     "max_steps": total, "max_seq_len": size.max_seq_len},
        "evaluation": {"enabled": True, "max_new_tokens": size.eval_max_new_tokens},
    }


def _runs_order(methods: list[str], seeds: int) -> list[tuple[str, int]]:
    """Longest runs first (DistiLLM-2 trains on twice the sequences), so the tail is short."""
    heavy = [m for m in methods if m.startswith("distillm2")]
    light = [m for m in methods if m not in heavy]
    return [(m, s) for s in range(seeds) for m in heavy] + [(m, s) for s in range(seeds) for m in light]


def run_repro(size: ReproSize, methods: list[str], out: Path, *, world: str = "toy", train: str | None = None,
              heldout: str | None = None, address: str | None = None, console: Any = None) -> dict[str, Any]:
    """Run the grid on ``world`` (a key of :data:`~kdray.repro.language.WORLDS`; its data
    unless ``train`` and ``heldout`` are given); write ``repro.json`` and ``repro.md`` into
    ``out``; return the result."""
    import ray
    from rich.console import Console

    from kdray.spec import parse_spec
    from kdray.data.text_scores import score_responses

    console = console or Console(stderr=True)
    size.check()
    the_world = WORLDS[world]
    train, heldout = train or the_world.train, heldout or the_world.heldout
    out = out.expanduser().resolve()
    for m in methods:  # every method's spec is valid before any work
        parse_spec(method_spec(m, size, train, heldout, out, world=the_world), f"kdray repro, method {m}")
    started = time.time()
    shared = _shared_stages(size, methods, out, the_world, train=train, heldout=heldout, address=address,
                            console=console)
    timings = shared["timings"]
    t_grid = time.perf_counter()
    runs, references = _run_grid(size, methods, shared, the_world, console)
    timings["grid"] = time.perf_counter() - t_grid
    check_rows, hf_check = shared["check_rows"], references.pop("generator_check")
    teacher_responses = [r["response"] for r in check_rows]
    pool_scores = score_responses((r["pool_answer"] for r in check_rows), teacher_responses)
    agree = (sum(r["pool_answer"].strip() == a.strip() for r, a in zip(check_rows, hf_check["answers"]))
             / max(1, len(check_rows)))
    timings["total"] = time.time() - started

    runs.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    result = {
        "config": {"size": asdict(size), "methods": methods, "seeds": list(range(size.seeds)), "world": world,
                   "response_source": the_world.response_source,
                   "pocl_stage_epochs": pocl_paper_stage_epochs(size.epochs) if size.budget == "paper" else None,
                   "data": {"train": train, "heldout": heldout}, "rows": shared["row_reports"],
                   "specs": {m: s.model_dump(mode="json") for m, s in shared["specs"].items()},
                   "ray_cpus": ray.cluster_resources().get("CPU")},
        "timings_s": timings,
        "references": {label: ref["scores"] for label, ref in references.items()},
        "generator_check": {"training_prompts": len(check_rows), "student_before_pool": pool_scores,
                            "student_before_hf": hf_check["scores"], "answer_agreement": agree},
        "runs": runs,
    }
    if the_world.language:
        from kdray.repro.language import LANGUAGE_SAMPLES

        result["language"] = {"prompts": len(shared["language_prompts"]), "samples": LANGUAGE_SAMPLES,
                              "references": {label: ref["language"] for label, ref in references.items()}}
    return write_outputs(result, out, console)


def _small_rows(artifact: Any, columns: list[str], by: str = "_row") -> list[dict[str, Any]]:
    """A committed dataset's rows (the repro grid's few hundred teacher responses, held-out rows
    or difficulty measurements), in row order (``by``), as dicts: its cells train and answer in
    plain Ray tasks that take the rows, not datasets (a job never does this)."""
    import pyarrow.parquet as pq

    rows = [r for f in artifact.info["files"] for r in pq.read_table(artifact.path / f, columns=columns).to_pylist()]
    return sorted(rows, key=lambda r: (r[by], r.get("sample_index", 0)))


def _shared_stages(size: ReproSize, methods: list[str], out: Path, world: ReproWorld, *, train: str, heldout: str,
                   address: str | None, console: Any) -> dict[str, Any]:
    """What every run shares, made once with the job's own stages through the vLLM pool: the
    checked data, the training responses (the teacher's, or the dataset's: ``world``), POCL's
    difficulty order and, from the same pass, the initial student's pool answers to the first
    training prompts (``check_rows``, for the generator check); plus each method's spec, sized
    to the rows that were kept, and on a world with a language the prompts scored against it."""
    from kdray.curriculum.plan import plan_segments
    from kdray.data.artifacts import open_artifact
    from kdray.pipeline.progress import ConsoleReporter
    from kdray.ray_setup import init_ray
    from kdray.spec import parse_spec
    from kdray.stages.context import StageContext
    from kdray.stages.difficulty import order_by_difficulty
    from kdray.stages.generate import training_responses
    from kdray.stages.prepare import prepare
    from kdray.toy import pin_for_job

    shared = parse_spec(method_spec("fkl+pocl", size, train, heldout, out, world=world), "kdray repro")
    out.mkdir(parents=True, exist_ok=True)
    (out / "events.jsonl").unlink(missing_ok=True)
    reporter = ConsoleReporter(out / "events.jsonl", console=console)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0, result = time.perf_counter(), fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t0
        return result

    try:
        ctx = StageContext(shared, Path(shared.output_dir).expanduser().resolve(), reporter)
        # as a job's driver: the toy: references' worlds built here on first use, pinned for the cells
        timed("world", pin_for_job, [shared.teacher.model, shared.student.model, train, heldout],
              progress=reporter.message)
        timed("ray_init", init_ray, address)  # prepare checks the training rows in Ray Data tasks
        data = timed("prepare", prepare, ctx)
        n_train, held_rows = data.train.rows, _small_rows(data.heldout, ["_row", "id", "prompt", "response"])
        specs = {m: parse_spec(method_spec(m, size, train, heldout, out, n_train, world), f"kdray repro, method {m}")
                 for m in methods}
        for m, spec in specs.items():  # a plan that cannot run fails before any generation
            plan_segments(spec, n_train)
        reporter.phase_start("generate", n_train, "teacher responses (vLLM pool)" if world.response_source == "teacher"
                             else "the dataset's responses")
        t0 = time.perf_counter()
        responses = training_responses(ctx, data.train)
        teacher_rows = _small_rows(responses, ["_row", "key", "id", "prompt", "response", "finish_reason",
                                               "sample_index"])
        phase = "teacher_generate" if world.response_source == "teacher" else "dataset_responses"
        timings[phase] = time.perf_counter() - t0
        reporter.phase_end("generate", f"training responses done in {timings[phase]:.0f}s")
        by_key = {r["key"]: r for r in teacher_rows}
        ordered = [by_key[k] for k in timed("pocl_difficulty", order_by_difficulty, ctx, responses)]
        # The pass's answer rows (its gold rows, vLLM's cross-entropy requests, have NaN ROUGE-L)
        measured = open_artifact(ctx.out / "curriculum" / "difficulty", "difficulty")
        answers = {r["key"]: r["student_response"] for r in _small_rows(measured, ["key", "student_response",
                                                                                   "gold_rouge_l"], by="key")
                   if not math.isnan(r["gold_rouge_l"])}
        check_rows = [{**r, "pool_answer": answers[r["key"]]} for r in teacher_rows[:size.heldout_rows]]
    finally:
        reporter.close()
    return {"spec": shared, "specs": specs, "row_reports": data.row_reports, "teacher_rows": teacher_rows,
            "ordered": ordered, "heldout": held_rows, "check_rows": check_rows, "timings": timings,
            "language_prompts": language_prompts(held_rows) if world.language else []}


def _run_grid(size: ReproSize, methods: list[str], shared: dict[str, Any], world: ReproWorld,
              console: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every method × seed as one Ray task (:func:`kdray.repro.run.train_and_evaluate`), and
    the two references scored the same way (on a world with a language, against it too); a
    failed cell is reported, not raised."""
    import ray

    from kdray.data.tokenize import job_encoding
    from kdray.repro.run import evaluate_reference, train_and_evaluate

    spec, specs = shared["spec"], shared["specs"]
    ordered_ref, plain_ref = ray.put(shared["ordered"]), ray.put(shared["teacher_rows"])
    held_ref = ray.put(shared["heldout"])
    task = ray.remote(num_cpus=1)(train_and_evaluate)
    ref_task = ray.remote(num_cpus=1)(evaluate_reference)
    encoding = job_encoding(spec)  # one prompt encoding: the teacher is scored on the student's prompts
    prompts = shared["language_prompts"] or None
    refs = {label: ref_task.remote(model.model, model.dtype, held_ref, max_new_tokens=spec.evaluation.max_new_tokens,
                                   encoding=encoding, language_prompts=prompts)
            for label, model in (("teacher", spec.teacher), ("student_before", spec.student))}
    # The generator check: HF's answers to the prompts the pool answered in the difficulty pass
    refs["generator_check"] = ref_task.remote(spec.student.model, spec.student.dtype, shared["check_rows"],
                                              max_new_tokens=spec.generation.max_new_tokens, encoding=encoding)
    order = _runs_order(methods, size.seeds)
    pending = {task.remote(specs[m].model_dump(mode="json"), m, s, ordered_ref, plain_ref, held_ref,
                           on_policy_temperature=size.on_policy_temperature, language_prompts=prompts): (m, s)
               for m, s in order}
    runs: list[dict[str, Any]] = []
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        method, seed = pending.pop(done)
        try:
            run = ray.get(done)
        except Exception as exc:  # one broken cell must not cost the grid; it is reported below
            run = {"method": method, "seed": seed, "error": str(exc).strip().splitlines()[-1][:500]}
        runs.append(run)
        from rich.markup import escape

        if run.get("error"):
            line = f"[red]failed[/]: {escape(run['error'])}"  # an error's text may hold [...]
        else:
            fit = run.get("language")
            line = (f"ROUGE-L {run['rougeL']:.3f}  EM {run['exact_match']:.3f}  "
                    + (f"KL {fit['kl']:.3f}  valid {fit['validity_sampled']:.2f}  cover {fit['coverage']:.2f}  "
                       if fit else "")
                    + f"(train {run['train_s']:.0f}s, eval {run['eval_s']:.1f}s, {run['steps']} steps)")
        console.print(f"[{len(runs):>3}/{len(order)}] {method:<28} seed {seed}: {line}", highlight=False,
                      soft_wrap=True)
    return runs, {label: ray.get(r) for label, r in refs.items()}
