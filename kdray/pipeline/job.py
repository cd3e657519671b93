"""The job driver: the only place that knows the order of the stages and what a re-run reuses.

prepare → generate (teacher pool) → [teacher signal] → [difficulty] → for each segment of the
plan: [student responses] → train → [evaluate the round] → evaluate → report.

It runs wherever ``kdray run`` runs: on a laptop it starts a local Ray; inside a Ray job (the
service submits one per kdray job) it joins that cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from kdray import toy
from kdray.curriculum.plan import Segment, plan_segments, total_steps
from kdray.data.artifacts import Artifact
from kdray.data.datasets import heldout_note
from kdray.errors import JobCancelled, KdrayError, first_line, interrupted, user_error
from kdray.models import hidden_size, vocab_size
from kdray.pools.faults import quiet_replica_deaths, replica_death_error
from kdray.pools.live import live_pool_cpus
from kdray.pipeline import budget
from kdray.pipeline.progress import Reporter, finite
from kdray.pipeline.state import JobState
from kdray.pipeline.storage import check_shared_storage
from kdray.ray_setup import init_ray
from kdray.report import render_report
from kdray.report.model_card import write_model_cards
from kdray.report.train_metrics import TRAIN_METRICS_FILE, StepLog
from kdray.spec import JobSpec, dump_spec
from kdray.stages import difficulty, evaluate, generate, judge, prepare, teacher_signal, train
from kdray.stages.context import StageContext
from kdray.train.checkpoints import read_steps_journal
from kdray.train.memory import job_estimate
from kdray.train.setup import check_lora_targets


class Job:
    """One run of a JobSpec. ``run()`` returns the report dict (also written as report.json).

    Args:
        spec: the validated job.
        reporter: where events go (default: nowhere but this object).
        address: the Ray cluster to join (default: the job's cluster, or a local one).
        restart: discard what an earlier run of the job left and start over.
    """

    def __init__(self, spec: JobSpec, reporter: Reporter | None = None, address: str | None = None,
                 restart: bool = False):
        self.spec = spec
        self.out = Path(spec.output_dir).expanduser().resolve()
        self.address = address
        self.restart = restart
        self.reporter = reporter or Reporter(None)
        self.ctx = StageContext(spec, self.out, self.reporter)
        #: Every step's metrics, in ``OUT/train_metrics.jsonl`` (the driver holds an index only).
        self.steps = StepLog(self.out / TRAIN_METRICS_FILE)
        #: The Ray session's logs directory on the driver's node, once this job started or joined
        #: Ray: where a pool replica that died on this node left its error
        #: (:func:`~kdray.pools.faults.replica_death_error`).
        self.ray_logs: Path | None = None

    # -- training metrics ----------------------------------------------------------------------

    def _record_metrics(self, event: dict[str, Any]) -> None:
        event = dict(event)
        resent = event.pop("resent", False)
        if (resent or "loss" not in event) and event.get("step") in self.steps:
            # A step sent once more in a segment's final report, or a bare end-of-segment marker
            # (kdray.train.checkpoints.final_steps), for a step already recorded: a worker group
            # that Ray Train restarted from the final checkpoint trains nothing, and a job whose
            # driver was killed after the final report restores it. It must neither replace the
            # step's metrics nor repeat them in the event history and the trackers.
            return
        self.reporter.train_metrics(event)
        self.steps.add(event)  # steps redone after a restore replace the lost ones, from that step on

    def _resume_history(self, state: JobState) -> None:
        """Start the event history over, or, when resuming, keep the earlier run's training
        steps (the report covers the whole job)."""
        events = self.out / "events.jsonl"
        self.steps.start()
        if not state.resumed:
            events.unlink(missing_ok=True)
            return
        self.reporter.message(f"resuming the job in {self.out} (kdray run --restart starts over)")
        if events.exists():
            # errors="replace": a character cut short when the earlier run was killed spoils its line only
            with events.open(encoding="utf-8", errors="replace") as lines:  # a line at a time, not the file
                for line in lines:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue  # a line cut short when the earlier run was killed
                    if event.get("kind") == "train_step":
                        self.steps.add({k: v for k, v in event.items() if k not in ("time", "kind")})

    def _recover_metrics(self, run_dir: Path) -> None:
        """Steps an earlier, killed run trained but never recorded (it died before draining
        their metrics): take them from rank 0's journal of the run's steps
        (:data:`~kdray.train.checkpoints.STEPS_JOURNAL`) and from every checkpoint it left (a
        run of a kdray from before the journal). Workers that outlive their driver by a moment
        may train on past several checkpoints, of which Ray Train keeps the last two: the
        journal holds every step. Steps past the checkpoint the run restores are trained again,
        and their new metrics replace these."""
        kept: dict[int, dict[str, Any]] = {}
        for path in run_dir.glob("checkpoint_*/progress.json"):
            try:
                progress = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a checkpoint being written when the run was killed
            kept.update({m["step"]: m for m in progress.get("metrics", []) if "step" in m})
        # the last of a step trained twice; only the steps the history lacks are kept (a journal
        # holds every step of the run: a long one, hundreds of MB of dicts)
        kept.update({m["step"]: m for m in read_steps_journal(run_dir) if m["step"] not in self.steps})
        for metrics in self.steps.add_missing(kept.values()):
            self.reporter.train_metrics(metrics)

    # -- stages a re-run reuses ----------------------------------------------------------------

    def _segment_data(self, segment: Segment, plan: list[Segment], base: Any, keys: Any,
                      student_dir: Path | None) -> Any:
        """The committed dataset a segment trains on: ``base`` (teacher responses or records),
        or in a DistiLLM-2 round those rows paired with the current student's responses (made
        once per round and saved, so a resumed round trains on the same responses)."""
        if not segment.regenerate_student:
            return base
        student = (self.spec.student.model_copy(update={"model": str(student_dir)}) if student_dir
                   else self.spec.student)
        return generate.student_responses(self.ctx, train.rows_of(base, keys), segment.n_rows, student, segment, len(plan))

    def score_round(self, segment: Segment, plan: list[Segment], student_dir: Path, state: JobState,
                     heldout: Artifact, round_scores: dict[str, Any]) -> None:
        """``evaluation.per_round``: score the student segment ``segment`` exported, unless it
        is the plan's last (that one is ``student_after``); kept in the job state."""
        ev = self.spec.evaluation
        if not (ev.enabled and ev.per_round and len(plan) > 1) or segment.index == len(plan) - 1:
            return
        label = f"student_round_{segment.index + 1}"
        scores = state.round_score(segment.index)
        if scores is not None:
            self.reporter.message(f"evaluate: reusing the scores of {label} recorded by an earlier run")
        else:
            model = self.spec.student.model_copy(update={"model": str(student_dir)})
            with self.ctx.phase("evaluate", heldout.rows, f"held-out answers, student after {segment.label(len(plan))}"):
                scores = evaluate.evaluate_models(self.ctx, [(label, model)], heldout)[label].info["scores"]
            state.save_round_score(segment.index, scores)
        round_scores[label] = scores
        self.reporter.emit("evaluation", model=label, scores=scores)

    # -- the whole job -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or resume) the job; return the report, also written to ``report.json``.

        Raises:
            SharedStorageError: a node of the Ray cluster does not share ``output_dir``; raised
                before any stage runs (:func:`~kdray.pipeline.storage.check_shared_storage`).
            KdrayError: a user's mistake (data, models, spec vs saved state, cluster) or a
                failed training run, with what to fix.
        """
        try:
            return self._run()
        finally:  # the toy build ids pinned for this job's processes (a later job pins its own)
            toy.unpin()

    def _run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        state = JobState.open(self.out, self.spec, restart=self.restart)  # refused: another job's directory, untouched
        try:
            return self._owned(state)
        except JobCancelled:
            raise
        except (KeyboardInterrupt, SystemExit) as exc:
            if interrupted(exc):  # Ctrl-C, or SIGTERM (the service's cancel): the directory says so
                self.reporter.stopped()
            raise
        except Exception as exc:  # the directory keeps why (kdray report and compare say it)
            died = self._replica_death(exc)
            user = died or user_error(exc)
            self.reporter.failed(str(user) if user is not None else first_line(exc))
            if died is not None:
                raise died from None
            raise

    def _replica_death(self, exc: BaseException) -> KdrayError | None:
        """Why a pool replica that Ray restarted as often as allowed died, when ``exc`` says one
        did (:func:`kdray.pools.faults.replica_death_error`)."""
        ray = sys.modules.get("ray")  # not imported for an error before Ray was
        if ray is None or not ray.is_initialized():
            return None
        return replica_death_error(exc, self.spec.generation.max_replica_restarts, self.ray_logs,
                                   ray.util.get_node_ip_address())

    def _owned(self, state: JobState) -> dict[str, Any]:
        """The run, once ``state`` says the output directory is this job's."""
        spec = self.spec
        self._resume_history(state)
        # The job's own directory, absolute: `kdray run OUT/spec.yaml` (the model card's way to
        # reproduce it) then means this job from any directory.
        (self.out / "spec.yaml").write_text(dump_spec(spec.model_copy(update={"output_dir": str(self.out)})),
                                            encoding="utf-8")
        if not spec.tracking.enabled:
            return self._stages(state, None)
        from kdray.report.trackers import Trackers

        trackers = Trackers(spec, self.out, state.resumed, self.steps, self.reporter.message)
        self.reporter.sinks.append(trackers)
        status = "FAILED"
        try:
            report = self._stages(state, trackers)
            status = "FINISHED"
            return report
        except (KeyboardInterrupt, JobCancelled):
            status = "KILLED"
            raise
        finally:
            self.reporter.sinks.remove(trackers)
            trackers.finish(status)

    def _stages(self, state: JobState, trackers: Any) -> dict[str, Any]:
        spec, ctx = self.spec, self.ctx
        started = time.time()

        # Every node that loads a toy:... checks it loads this driver's toy world (its build id).
        toy.pin_for_job([spec.teacher.model, spec.student.model, spec.data.train, spec.data.heldout]
                        + ([spec.evaluation.judge.model.model] if spec.evaluation.judge else []),
                        progress=self.reporter.message)
        context = init_ray(self.address)  # prepare reads and checks the training rows in Ray Data tasks
        if context is not None:  # a Ray this process started or joined (not one it was already in)
            self.ray_logs = Path(context.address_info["session_dir"]) / "logs"
        quiet_replica_deaths()  # the job says why a replica died (_replica_death), not Ray Data's tracebacks
        nodes = check_shared_storage(self.out)  # before any stage writes what another node reads
        if len(nodes) > 1:
            self.reporter.message(f"storage: all {len(nodes)} nodes of the Ray cluster share {self.out}")
        data = prepare.prepare(ctx)
        n_rows = data.train.rows * (spec.generation.n if spec.data.response_source == "teacher" else 1)
        plan = plan_segments(spec, n_rows)  # before any work: a plan that cannot run fails now
        check_lora_targets(spec)  # training.lora names modules the student has
        train.check_ingest_cpus(spec.training.num_workers, live_pool_cpus(spec))  # room for the reads
        self.reporter.message(f"plan: {len(plan)} segment(s), {total_steps(plan)} optimizer steps")
        if note := heldout_note(spec.data, spec.evaluation.enabled):  # a mistake, or a smoke test
            self.reporter.message(f"plan: note: {note}")
        vocab, hidden = vocab_size(spec.teacher.model), hidden_size(spec.teacher.model)
        sizes = budget.storage_plan(spec, data.train.rows, teacher_vocab=vocab, teacher_hidden=hidden,
                                    n_heldout=data.heldout.rows, segments=len(plan))
        if sizes:
            self.reporter.message("plan: writes " + "; ".join(s.describe() for s in sizes))
        budget.check_records_budget(spec, sizes, teacher_vocab=vocab)  # before any generation
        memory = job_estimate(spec)
        self.reporter.message(f"plan: a training worker holds about {memory.total / 2**30:.2f} GiB "
                              f"({'GPU' if memory.on == 'gpu' else 'RAM'}; kdray validate lists the parts)")
        budget.check_memory_budget(spec, memory)

        responses = generate.training_responses(ctx, data.train)
        base, signal_meta, signal_stats = responses, None, None
        if spec.scores_records:
            base, signal_meta, signal_stats = teacher_signal.score_signal(ctx, responses)
        order = difficulty.order_by_difficulty(ctx, responses) if spec.curriculum_of("pocl") is not None else None

        student_dir: Path | None = None
        checkpoint: str | None = None
        round_scores: dict[str, Any] = {}
        round_students: dict[str, Path] = {}  # every segment's export but the last, for its model card
        for segment in plan:
            done = state.finished(segment.index)
            if done is not None:
                self.reporter.message(f"train: segment {segment.index + 1}/{len(plan)} was finished by an earlier run")
                student_dir, checkpoint = Path(done["student"]), done["checkpoint"]
            else:
                # a POCL stage trains on the easiest rows; others on all of them
                keys = order[: segment.n_rows] if order is not None and segment.n_rows < base.rows else None
                data_for_segment = self._segment_data(segment, plan, base, keys, student_dir)
                if segment.regenerate_student:
                    keys = None  # the round's dataset holds exactly the segment's rows
                run_name = state.run_name(segment.index, f"{spec.name}-{segment.index}-{uuid.uuid4().hex[:8]}")
                self._recover_metrics(self.out / "ray_train" / run_name)
                student_dir, checkpoint = train.train_segment(
                    ctx, data_for_segment, segment, plan, keys=keys, init_checkpoint=checkpoint, run_name=run_name,
                    signal_meta=signal_meta, heldout=data.heldout, on_metrics=self._record_metrics)
                state.finish(segment.index, checkpoint, str(student_dir))
            self.score_round(segment, plan, student_dir, state, data.heldout, round_scores)
            if segment.index < len(plan) - 1:
                round_students[f"student_round_{segment.index + 1}"] = student_dir
        final = self.out / "student"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(student_dir, final)
        evaluation, paired, verdicts = self._evaluate(final, data.heldout, round_scores)

        with ctx.phase("report", 1, "report.json, report.md, plots"):
            report = {
                "name": spec.name,
                "status": "succeeded",
                "started": started,
                "finished": time.time(),
                "timings_s": ctx.timings,
                "rows": data.row_reports,
                "evaluation": evaluation,
                "paired_differences": paired,  # prompt by prompt: student after vs before, vs the teacher, rounds
                "judge": verdicts,
                "teacher_signal": {"mode": spec.teacher_signal.mode, **(signal_stats or {})},
                "student_dir": str(final),
                "plan": [seg.as_dict() for seg in plan],
                "spec": spec.model_dump(mode="json"),
                # every step's metrics: a file of their own (kdray.report.train_metrics)
                "train_metrics_file": TRAIN_METRICS_FILE,
                "train_summary": self.steps.summary(),
            }
            tmp = self.out / "report.json.tmp"
            tmp.write_text(json.dumps(finite(report), indent=2, default=str, allow_nan=False), encoding="utf-8")
            os.replace(tmp, self.out / "report.json")
            written = render_report(self.out)
            if trackers is not None:
                trackers.report(written)
            write_model_cards(report, {**round_students, "student_after": final}, spec_path=str(self.out / "spec.yaml"))
            self.reporter.advance("report")
        return report

    def _evaluate(self, final: Path, heldout: Artifact, round_scores: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """Held-out scores of teacher, student before, each round and student after (the order
        of the report's tables), the student's paired differences to the others and each
        round's to the one before (:func:`~kdray.stages.evaluate.paired_scores`), and the
        judge's verdicts."""
        spec = self.spec
        if not spec.evaluation.enabled:
            return {}, {}, None
        models = [("teacher", spec.teacher), ("student_before", spec.student),
                  ("student_after", spec.student.model_copy(update={"model": str(final)}))]
        with self.ctx.phase("evaluate", 3 * heldout.rows, "held-out answers"):
            answers = evaluate.evaluate_models(self.ctx, models, heldout)
        scores = {label: written.info["scores"] for label, written in answers.items()}
        evaluation = {**{k: v for k, v in scores.items() if k != "student_after"}, **round_scores,
                      "student_after": scores["student_after"]}
        for label in ("teacher", "student_before", "student_after"):
            self.reporter.emit("evaluation", model=label, scores=scores[label])
        verdicts = judge.judge(self.ctx, heldout, answers) if spec.evaluation.judge is not None else None
        rounds, round_pairs = evaluate.round_pairs(self.out, round_scores)
        return evaluation, evaluate.paired_scores({**answers, **rounds}, (*evaluate.PAIRED, *round_pairs)), verdicts
