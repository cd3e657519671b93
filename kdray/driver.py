"""The job driver: the only place that knows the order of the stages.

prepare → generate (teacher pool) → train (Ray Train + DeepSpeed) → evaluate → report.

It runs wherever ``kdray run`` runs: on a laptop it starts a local Ray; inside a Ray job (the
service submits one per kdray job) it joins that cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from kdray.errors import KdrayError
from kdray.ray_setup import init_ray
from kdray.progress import Reporter
from kdray.job_state import JobState
from kdray.plan import Segment, plan_segments, total_steps
from kdray.spec import JobSpec, ModelSpec, dump_spec


def _count_tokens_fn(tokenizer: Any, chat_template: str) -> Callable[[list[str]], list[int]]:
    from kdray.records import prompt_token_ids, uses_chat_template

    use = uses_chat_template(tokenizer, chat_template)
    return lambda prompts: [len(ids) for ids in prompt_token_ids(tokenizer, prompts, use)]


class Job:
    """One run of a JobSpec. ``run()`` returns the report dict (also written as report.json)."""

    def __init__(self, spec: JobSpec, reporter: Reporter | None = None, address: str | None = None,
                 restart: bool = False):
        self.spec = spec
        self.out = Path(spec.output_dir).expanduser().resolve()
        self.address = address
        self.restart = restart
        self.reporter = reporter or Reporter(None)
        self.timings: dict[str, float] = {}
        self.heldout: list[dict[str, Any]] = []
        self.metrics_history: list[dict[str, Any]] = []
        self.vocab_size: int | None = None
        # teacher_signal topk / hidden: the records file's layout and its rows by key, and its size
        self.signal: tuple[dict[str, Any], dict[str, dict[str, Any]]] | None = None
        self.signal_stats: dict[str, Any] | None = None
        self.round_scores: dict[str, dict[str, Any]] = {}  # student_round_N -> held-out scores
        self.answers: dict[str, dict[str, str]] = {}        # evaluated model -> {row id: answer}

    # -- stages -------------------------------------------------------------------------------

    def _phase(self, name: str, total: int | None, detail: str = ""):
        job = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()
                job.reporter.phase_start(name, total, detail)
                return self

            def __exit__(self, exc_type, exc, tb):
                elapsed = time.perf_counter() - self.t0
                job.timings[name] = job.timings.get(name, 0.0) + elapsed  # summed over rounds
                if exc_type is None:
                    job.reporter.phase_end(name, f"{detail} done in {elapsed:.0f}s".strip())
                return False

        return _Phase()

    def prepare(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        from kdray.data import load_split
        from kdray.models import load_tokenizer

        spec = self.spec
        with self._phase("prepare", 2, "read and check data"):
            from kdray.models import shared_vocab_size

            self.vocab_size = shared_vocab_size(spec.teacher.model, spec.student.model)  # or a clear error, now
            count = _count_tokens_fn(load_tokenizer(spec.student.model), spec.data.chat_template)
            need_train_response = spec.data.response_source == "dataset"
            train, train_report = load_split(spec.data, "train", count, need_response=need_train_response)
            self.reporter.advance("prepare")
            heldout, held_report = load_split(
                spec.data, "heldout", count,
                need_response=spec.evaluation.enabled or spec.curriculum_of("replay") is not None,
            )
            self.reporter.advance("prepare")
        return train, heldout, {"train": train_report.as_dict(), "heldout": held_report.as_dict()}

    def generate(self, rows: list[dict[str, Any]], model: ModelSpec, label: str, phase: str, sampling: Any,
                 score_gold: bool = False) -> list[dict[str, Any]]:
        from kdray.generation import generate

        self.reporter.message(f"{phase}: {label} answers {len(rows)} prompts ({model.model})")
        return generate(
            rows, model, self.spec.generation, sampling, score_gold=score_gold,
            chat_template=self.spec.data.chat_template, on_rows=lambda n: self.reporter.advance(phase, n),
        )

    def student_responses(self, rows: list[dict[str, Any]], student: ModelSpec, segment: Segment,
                          plan_length: int, state: JobState) -> list[dict[str, Any]]:
        """Pair every training row with the current student's response to its prompt
        (DistiLLM-2's batched on-policy round): one sample per distinct prompt, saved so a
        resumed round trains on the same responses."""
        from kdray.generation import SamplingConfig

        name = f"round-{segment.round}-student"
        generated = state.load_rows(name)
        if generated is None:
            prompts = list({r["id"]: r for r in rows}.values())
            label = segment.label(plan_length) or "round 1/1"
            with self._phase("generate", len(prompts), f"student responses, {label}"):
                generated = self.generate(prompts, student, "student", "generate",
                                          SamplingConfig.from_spec(self.spec.generation, n=1,
                                                                   seed=self.spec.generation.seed + segment.index))
            state.save_rows(name, generated)
        by_id = {g["id"]: g for g in generated}
        return [dict(r, student_response=by_id[r["id"]]["response"],
                     student_finish_reason=by_id[r["id"]]["finish_reason"]) for r in rows]

    def order_by_difficulty(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POCL's difficulty measurer: the rows sorted easy → hard, measured once per job.

        The initial student answers every training prompt greedily and scores each row's
        response (the one it will be trained on); ROUGE-L of its answer against that response
        and its mean token cross-entropy on it are fused by reciprocal rank. The measurements
        and ranks are written to ``curriculum/difficulty.jsonl``; a later run of the same job
        over the same rows reads them instead of measuring again.
        """
        from kdray.curriculum import difficulty_ranks
        from kdray.difficulty import read_difficulty, write_difficulty
        from kdray.evaluate import rouge_l
        from kdray.generation import SamplingConfig

        pocl = self.spec.curriculum_of("pocl")
        path = self.out / "curriculum" / "difficulty.jsonl"
        keys = [f"{r['id']}#{r.get('sample_index', 0)}" for r in rows]
        saved = read_difficulty(path, keys, self.spec.student.model)
        if saved is not None:
            self.reporter.message(f"score: reusing the difficulty ranks in {path}")
            return [rows[i] for i in saved]
        with self._phase("score", len(rows), "difficulty of each training row (POCL)"):
            measured = self.generate(rows, self.spec.student, "initial student", "score",
                                     SamplingConfig.greedy(self.spec.generation.max_new_tokens),
                                     score_gold=True)
            rouge = [rouge_l(m["response"], r["response"]) for m, r in zip(measured, rows)]
            ce = [m["gold_ce"] for m in measured]
            ranks = difficulty_ranks(rouge, ce, k=pocl.rrf_k)
            order = [int(i) for i in ranks.order]
            write_difficulty(path, keys, ranks, self.spec.student.model)
        return [rows[i] for i in order]

    def score_signal(self, rows: list[dict[str, Any]]) -> None:
        """teacher_signal ``topk`` / ``hidden``: score every training response with the teacher
        pool once, into ``records/teacher-<mode>.parquet``; a re-run of the job reuses the file."""
        from kdray.models import vocab_size
        from kdray.records import read_signal_records, signal_key, topk_id_dtype, write_signal_records
        from kdray.scoring import score_teacher

        sig, teacher = self.spec.teacher_signal, self.spec.teacher
        path = self.out / "records" / f"teacher-{sig.mode}.parquet"
        keys = [signal_key(r) for r in rows]
        if path.exists():
            meta, stored = read_signal_records(path)
            if set(keys) <= stored.keys():
                self.reporter.message(f"score: reusing the teacher records in {path}")
                tokens = sum(r["n_tokens"] for r in stored.values())
                size = path.stat().st_size
                self.signal = meta, stored
                self.signal_stats = {"rows": len(stored), "tokens": tokens, "bytes": size,
                                     "bytes_per_token": size / max(tokens, 1), "file": str(path)}
                return
        with self._phase("score", len(rows), f"teacher {sig.mode} records"):
            records = score_teacher(rows, self.spec, on_rows=lambda n: self.reporter.advance("score", n))
            teacher_vocab = vocab_size(teacher.model)
            meta: dict[str, Any] = {"mode": sig.mode, "teacher": teacher.model, "vocab_size": teacher_vocab}
            if sig.mode == "topk":
                meta.update(k=sig.k, id_dtype=topk_id_dtype(teacher_vocab))
            else:
                meta.update(hidden_dtype=sig.hidden_dtype, hidden_size=int(records[0]["hidden"].shape[1]))
            stats = write_signal_records(path, keys, records, meta)
            self.reporter.message(f"score: {stats['tokens']} response tokens, {stats['bytes_per_token']:.1f} bytes/token "
                                  f"({stats['bytes'] / 2**20:.2f} MiB) in {path.name}")
        meta, stored = read_signal_records(path)
        self.signal, self.signal_stats = (meta, stored), {**stats, "file": str(path)}

    def train(self, rows: list[dict[str, Any]], segment: Segment, plan: list[Segment],
              init_checkpoint: str | None, run_name: str) -> tuple[Path, str | None]:
        """Run one segment of the plan on ``rows``: (exported student, state for the next).

        ``run_name`` names the Ray Train run; a name used before (a resumed job) makes Ray
        Train restore that run's latest checkpoint."""
        import ray.data
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from kdray.progress import make_progress_hub, train_metrics_callback
        from kdray.training import TokenizeForTraining, WorkerConfig, train_loop_per_worker

        spec, t = self.spec, self.spec.training

        def tokenized(items: list[dict[str, Any]], columns: list[str], signal: Any = None) -> Any:
            from kdray.records import signal_key

            table = [{c: r.get(c, "stop") for c in columns} for r in items]
            if signal is not None:  # each row carries its stored teacher record
                for row, item in zip(table, items):
                    row.update(signal[1][signal_key(item)])
            return ray.data.from_items(table).map_batches(
                TokenizeForTraining,
                fn_constructor_kwargs=dict(tokenizer_ref=spec.student.model, max_seq_len=t.max_seq_len,
                                           chat_template=spec.data.chat_template,
                                           signal_meta=signal[0] if signal is not None else None),
                batch_size=256,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=0.25,
            ).materialize()

        columns = ["prompt", "response", "finish_reason"]
        if segment.regenerate_student:
            columns += ["student_response", "student_finish_reason"]
        datasets = {"train": tokenized(rows, columns, self.signal)}
        replay = spec.curriculum_of("replay")
        if replay is not None:  # DistiLLM's validation loss: held-out prompts, reference responses
            datasets["validation"] = tokenized(self.heldout[: replay.validation_samples], ["prompt", "response"])
        hub = make_progress_hub()
        worker = WorkerConfig(spec=spec, segment=segment, total_steps=total_steps(plan),
                              num_segments=len(plan), init_checkpoint=init_checkpoint)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"worker": worker},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(self.out / "ray_train"),
                callbacks=[train_metrics_callback(hub)],
                failure_config=FailureConfig(max_failures=t.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            datasets=datasets,
        )
        result_box: dict[str, Any] = {}

        def fit() -> None:
            try:
                result_box["result"] = trainer.fit()
            except BaseException as exc:  # re-raised in the driver thread below
                result_box["error"] = exc

        label = segment.label(len(plan))
        detail = f"{t.num_workers} workers, ZeRO-{t.zero_stage}" + (f", {label}" if label else "")
        with self._phase("train", segment.end_step, detail):
            if segment.start_step:  # the bar counts the job's optimizer steps
                self.reporter.advance("train", segment.start_step)
            thread = threading.Thread(target=fit, daemon=True)
            thread.start()
            while thread.is_alive():
                thread.join(timeout=0.5)
                self._drain(hub)
            self._drain(hub)
            if "error" in result_box:
                raise KdrayError(f"training failed: {_root_cause(result_box['error'])}")
            result = result_box["result"]
            if result.checkpoint is None:
                raise KdrayError("training finished without a final checkpoint")
            # storage_path is a local directory, so the checkpoint's path is readable here (and
            # by the next segment's workers on this node; multi-node needs shared storage).
            ckpt = Path(result.checkpoint.path)
        return ckpt / "student", str(ckpt) if (ckpt / "progress.json").exists() else None

    def _resume_history(self, state: JobState) -> None:
        """Start the event history over, or, when resuming, keep the earlier run's training
        steps (the report covers the whole job)."""
        events = self.out / "events.jsonl"
        if not state.resumed:
            events.unlink(missing_ok=True)
            return
        self.reporter.message(f"resuming the job in {self.out} (kdray run --restart starts over)")
        if events.exists():
            for line in events.read_text(encoding="utf-8").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line cut short when the earlier run was killed
                if event.get("kind") == "train_step":
                    event = {k: v for k, v in event.items() if k not in ("time", "kind")}
                    self.metrics_history = [m for m in self.metrics_history if m["step"] < event["step"]]
                    self.metrics_history.append(event)

    def _recover_metrics(self, run_dir: Path) -> None:
        """Steps an earlier, killed run trained and checkpointed but never recorded (it died
        before draining their metrics): take them from that run's latest checkpoint."""
        latest: dict[str, Any] | None = None
        for path in run_dir.glob("checkpoint_*/progress.json"):
            try:
                progress = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if latest is None or progress.get("step", 0) > latest.get("step", 0):
                latest = progress
        known = {m.get("step") for m in self.metrics_history}
        for metrics in (latest or {}).get("metrics", []):
            if metrics.get("step") not in known:
                self.reporter.train_metrics(metrics)
                self.metrics_history.append(metrics)
        self.metrics_history.sort(key=lambda m: m.get("step", 0))

    def _drain(self, hub: Any) -> None:
        import ray

        for event in ray.get(hub.drain.remote()):
            self.reporter.train_metrics(event)
            if "step" in event:  # steps redone after a restore replace the lost ones
                self.metrics_history = [m for m in self.metrics_history if m.get("step", 0) < event["step"]]
            self.metrics_history.append(event)

    # -- the whole job -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from kdray.generation import SamplingConfig
        from kdray.report import render_report
        from kdray.training import check_lora_targets

        spec = self.spec
        self.out.mkdir(parents=True, exist_ok=True)
        state = JobState.open(self.out, spec, restart=self.restart)
        self._resume_history(state)
        (self.out / "spec.yaml").write_text(dump_spec(spec), encoding="utf-8")
        started = time.time()

        train, heldout, row_reports = self.prepare()
        self.heldout = heldout
        n_rows = len(train) * (spec.generation.n if spec.data.response_source == "teacher" else 1)
        plan = plan_segments(spec, n_rows)  # before any work: a plan that cannot run fails now
        check_lora_targets(spec)  # training.lora names modules the student has
        self.reporter.message(f"plan: {len(plan)} segment(s), {total_steps(plan)} optimizer steps")
        init_ray(self.address)

        train_rows = state.load_rows("train_rows")
        if train_rows is not None:
            self.reporter.message(f"generate: reusing {len(train_rows)} training responses saved by an earlier run")
        elif spec.data.response_source == "teacher":
            with self._phase("generate", len(train) * spec.generation.n, "teacher responses"):
                train_rows = self.generate(
                    train, spec.teacher, "teacher", "generate", SamplingConfig.from_spec(spec.generation)
                )
        else:
            train_rows = [dict(r, sample_index=0, finish_reason="stop") for r in train]
        state.save_rows("train_rows", train_rows)

        if spec.teacher_signal.mode != "online":
            self.score_signal(train_rows)
        if spec.curriculum_of("pocl") is not None:
            train_rows = self.order_by_difficulty(train_rows)
        student_dir: Path | None = None
        checkpoint: str | None = None
        for segment in plan:
            done = state.finished(segment.index)
            if done is not None:
                self.reporter.message(f"train: segment {segment.index + 1}/{len(plan)} was finished by an earlier run")
                student_dir, checkpoint = Path(done["student"]), done["checkpoint"]
                self.score_round(segment, plan, student_dir, state)
                continue
            rows = train_rows[: segment.n_rows]
            if segment.regenerate_student:
                student = spec.student.model_copy(update={"model": str(student_dir)}) if student_dir else spec.student
                rows = self.student_responses(rows, student, segment, len(plan), state)
            run_name = state.run_name(segment.index, f"{spec.name}-{segment.index}-{uuid.uuid4().hex[:8]}")
            self._recover_metrics(self.out / "ray_train" / run_name)
            student_dir, checkpoint = self.train(rows, segment, plan, checkpoint, run_name)
            state.finish(segment.index, checkpoint, str(student_dir))
            self.score_round(segment, plan, student_dir, state)
        final = self.out / "student"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(student_dir, final)
        student_dir = final
        student = spec.student.model_copy(update={"model": str(final)})

        evaluation: dict[str, Any] = {}
        judge: dict[str, Any] | None = None
        if spec.evaluation.enabled:
            after = student
            with self._phase("evaluate", 3 * len(heldout), "held-out answers"):
                for label, model in (
                    ("teacher", spec.teacher),
                    ("student_before", spec.student),
                    ("student_after", after),
                ):
                    evaluation[label] = self.evaluate_model(label, model)
            # teacher, student_before, student_round_1..N-1, student_after: the order of tables
            evaluation = {**{k: v for k, v in evaluation.items() if k != "student_after"}, **self.round_scores,
                          "student_after": evaluation["student_after"]}
            if spec.evaluation.judge is not None:
                judge = self.judge()

        with self._phase("report", 1, "report.json, report.md, plots"):
            report = {
                "name": spec.name,
                "status": "succeeded",
                "started": started,
                "finished": time.time(),
                "timings_s": self.timings,
                "rows": row_reports,
                "evaluation": evaluation,
                "judge": judge,
                "train_metrics": self.metrics_history,
                "teacher_signal": {"mode": spec.teacher_signal.mode, **(self.signal_stats or {})},
                "student_dir": str(student_dir),
                "plan": [seg.as_dict() for seg in plan],
                "spec": spec.model_dump(mode="json"),
            }
            tmp = self.out / "report.json.tmp"
            tmp.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
            os.replace(tmp, self.out / "report.json")
            render_report(self.out)
            self.reporter.advance("report")
        return report

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate_model(self, label: str, model: ModelSpec) -> dict[str, Any]:
        """Greedy answers of ``model`` to the held-out prompts through the generation pool,
        scored (ROUGE-L, exact match, length), written to ``samples/LABEL.jsonl`` and kept for
        the judge."""
        from kdray.evaluate import score_generated
        from kdray.generation import SamplingConfig

        generated = self.generate(self.heldout, model, label, "evaluate",
                                  SamplingConfig.greedy(self.spec.evaluation.max_new_tokens))
        self._write_samples(label, generated, self.heldout)
        self.answers[label] = {g["id"]: g["response"] for g in generated if g.get("sample_index", 0) == 0}
        return score_generated(generated, self.heldout)

    def score_round(self, segment: Segment, plan: list[Segment], student_dir: Path, state: JobState) -> None:
        """``evaluation.per_round``: score the student segment ``segment`` exported, unless it
        is the plan's last (that one is ``student_after``). Scores are kept in the job state,
        so a resumed job keeps the rounds an earlier run scored."""
        ev = self.spec.evaluation
        if not (ev.enabled and ev.per_round and len(plan) > 1) or segment.index == len(plan) - 1:
            return
        label = f"student_round_{segment.index + 1}"
        scores = state.round_score(segment.index)
        if scores is not None:
            self.reporter.message(f"evaluate: reusing the scores of {label} recorded by an earlier run")
        else:
            model = self.spec.student.model_copy(update={"model": str(student_dir)})
            detail = f"held-out answers, student after {segment.label(len(plan))}"
            with self._phase("evaluate", len(self.heldout), detail):
                scores = self.evaluate_model(label, model)
            state.save_round_score(segment.index, scores)
        self.round_scores[label] = scores

    def judge(self) -> dict[str, Any]:
        """``evaluation.judge``: the judge model (served by the generation pool, greedy) compares
        the distilled student's held-out answers with the reference's, in both orders. Prompts
        whose judge prompt does not fit the judge's ``max_model_len`` are skipped and counted.
        Each verdict is written to ``samples/judge.jsonl``."""
        from transformers import AutoTokenizer

        from kdray.evaluate import judge_requests, judge_summary, parse_verdict
        from kdray.generation import SamplingConfig
        from kdray.models import resolve_model

        cfg = self.spec.evaluation.judge
        student, reference = self.answers["student_after"], self.answers[cfg.reference]
        rows = self.heldout[: cfg.max_prompts] if cfg.max_prompts else self.heldout
        requests = judge_requests([{"id": r["id"], "prompt": r["prompt"], "student": student[r["id"]],
                                    "reference": reference[r["id"]]} for r in rows], cfg.template)
        count = _count_tokens_fn(AutoTokenizer.from_pretrained(resolve_model(cfg.model.model)),
                                 self.spec.data.chat_template)
        room = cfg.model.max_model_len - cfg.max_new_tokens
        too_long = {q["item"] for q, n in zip(requests, count([q["prompt"] for q in requests])) if n > room}
        requests = [q for q in requests if q["item"] not in too_long]
        verdicts: dict[str, list[str | None]] = {}
        outputs: dict[str, str] = {}
        if requests:
            with self._phase("evaluate", len(requests), f"LLM judge, student_after vs {cfg.reference}"):
                generated = self.generate(requests, cfg.model, "judge", "evaluate",
                                          SamplingConfig.greedy(cfg.max_new_tokens))
            outputs = {g["id"]: g["response"] for g in generated}
            for q in requests:  # [verdict with the student as A, verdict with the student as B]
                verdicts.setdefault(q["item"], [None, None])[0 if q["order"] == "ab" else 1] = \
                    parse_verdict(outputs[q["id"]])
        summary = judge_summary({k: (ab, ba) for k, (ab, ba) in verdicts.items()})
        summary.update(model=cfg.model.model, reference=cfg.reference, skipped_too_long=len(too_long))
        path = self.out / "samples" / "judge.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for q in requests:
                fh.write(json.dumps({"id": q["item"], "order": "student_first" if q["order"] == "ab" else
                                     "student_second", "judge_prompt": q["prompt"], "output": outputs[q["id"]],
                                     "verdict": parse_verdict(outputs[q["id"]])}) + "\n")
        self.reporter.message(
            f"evaluate: judge win rate of student_after vs {cfg.reference}: "
            + (f"{summary['win_rate']:.3f} over {summary['comparisons']} comparisons" if summary["comparisons"]
               else f"no comparisons ({len(too_long)} prompts too long for the judge)"))
        return summary

    def _write_samples(self, label: str, generated: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> None:
        gold = {r["id"]: r["response"] for r in heldout}
        path = self.out / "samples" / f"{label}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in generated:
                fh.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "response": r["response"],
                                     "gold": gold.get(r["id"])}) + "\n")


def _root_cause(exc: BaseException) -> str:
    """The innermost user-meaningful message of a Ray Train failure."""
    seen = exc
    while True:
        inner = getattr(seen, "worker_failures", None) or {}
        if inner:
            seen = next(iter(inner.values()))
            continue
        if seen.__cause__ is not None and seen.__cause__ is not seen:
            seen = seen.__cause__
            continue
        break
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
