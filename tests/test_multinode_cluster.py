"""What only a real cluster gets wrong, on one simulated cluster (tests/multinode.py): a head
with no CPUs and three worker nodes of one CPU each, started once for the module.

Storage: the worker node ``node_a`` has ``STORAGE/private`` covered by an empty tmpfs of its own:
an output_dir under it is what a node without the shared mount sees. The check must name that
node, the path and the fix, before any stage runs, in the Python API and through ``kdray run``
(also when Ray Train would retry forever, ``training.max_failures: -1``). A model directory
under it, loaded on ``node_a``, fails there with an error naming that node, not as a hub id.

A job: two-stage POCL under ``STORAGE/shared``, its two Ray Train workers on two nodes (gloo
across nodes), with per-round evaluation, the judge and checkpoints; once stage 2 is past a
checkpoint one of those nodes is lost (its whole session killed) and a replacement joins, and
the job finishes from the latest checkpoint with the failure policy's defaults. It loses a
node, so it comes last in this module; before it, a preemption: a training node drained with a
deadline, checkpointed at the notice and before the deadline, taken and replaced.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multinode import WORKERS, cluster_fixture

REPO = Path(__file__).resolve().parents[1]
FIX = "mount the same shared filesystem at the same path on every node"

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def cluster(storage):
    yield from cluster_fixture({"node_a": [storage / "private"]})


def _exists_on(node_id: str, path: Path) -> bool:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    look = ray.remote(num_cpus=0)(os.path.exists)
    return ray.get(look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                   .remote(str(path)), timeout=60)


def test_the_cluster_has_a_cpu_less_head_three_named_workers_and_a_private_path(cluster, storage):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 4
    assert {n["NodeID"]: n["Resources"].get("CPU", 0) for n in nodes} == {
        cluster.node_id("head"): 0, **{cluster.node_id(name): 1 for name in WORKERS}}
    seen = storage / "private" / "seen-by-three.txt"
    seen.write_text("x")
    assert {name: _exists_on(cluster.node_id(name), seen) for name in ("head", *WORKERS)} == {
        "head": True, "node_a": False, "node_b": True, "node_c": True}


def test_a_shared_output_dir_passes_on_every_node(cluster, storage):
    from kdray.pipeline.storage import MARKER_PREFIX, check_shared_storage

    out = storage / "shared" / "job"
    out.mkdir(parents=True)
    nodes = check_shared_storage(out)
    ids = [n.node_id for n in nodes]
    assert len(set(ids)) == len(ids) == 4
    assert set(ids) == {cluster.node_id(name) for name in ("head", *WORKERS)}
    assert not list(out.glob(MARKER_PREFIX + "*"))


def test_an_output_dir_private_to_one_node_fails_naming_it(cluster, storage):
    from kdray.errors import SharedStorageError
    from kdray.pipeline.storage import MARKER_PREFIX, check_shared_storage

    out = storage / "private" / "job"
    out.mkdir(parents=True)  # here, on the driver's (the head's) filesystem
    started = time.monotonic()
    with pytest.raises(SharedStorageError) as err:
        check_shared_storage(out)
    assert time.monotonic() - started < 60
    text = str(err.value)
    assert f"node {cluster.node_id('node_a')} (" in text and "does not see the marker" in text
    assert cluster.node_id("node_b") not in text
    assert str(out) in text and FIX in text
    assert not list(out.glob(MARKER_PREFIX + "*"))


def test_kdray_run_fails_at_once_before_generating(cluster, storage, toy_world):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    out = storage / "private" / "cli-job"
    spec.update(name="private-output", output_dir=str(out))
    spec["data"].update(max_train_samples=64, max_heldout_samples=16)
    spec["training"].update(max_failures=-1, checkpoint_every_steps=1)
    path = storage / "private-output.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "kdray.cli", "run", str(path)], cwd=storage, env=env,
                         capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - started
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    stderr = " ".join(res.stderr.split())  # rich wraps long lines
    assert f"node {cluster.node_id('node_a')} (" in stderr and str(out) in stderr and FIX in stderr
    print(f"kdray run exited {res.returncode} after {elapsed:.1f} s; stderr:\n{res.stderr}")  # shown with -s
    log = out / "events.jsonl"  # written from the first event on
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert not [e for e in events if e["kind"] == "train_step"]
    assert not [e for e in events if e["kind"] == "phase_start"], "the check runs before any stage"
    assert (out / "spec.yaml").exists() and not (out / "datasets").exists() and not (out / "ray_train").exists()
    assert elapsed < 60, f"kdray run took {elapsed:.0f} s to fail"


def test_a_model_directory_missing_on_one_node_fails_there_naming_it_not_as_a_hub_id(cluster, storage, toy_world):
    import shutil

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kdray.errors import ModelError

    model = storage / "private" / "student"  # node_a's tmpfs hides it; the other nodes see it
    shutil.copytree(toy_world.student_dir, model)

    def on(name: str, fn, *args):
        task = ray.remote(num_cpus=0, max_retries=0)(fn)
        strategy = NodeAffinitySchedulingStrategy(cluster.node_id(name), soft=False)
        return ray.get(task.options(scheduling_strategy=strategy).remote(*args), timeout=120)

    from kdray.models import load_tokenizer, resolve_model

    assert on("node_b", resolve_model, str(model)) == str(model.resolve())
    started = time.monotonic()
    with pytest.raises(ModelError) as err:
        on("node_a", lambda ref: len(load_tokenizer(ref)), str(model))
    text = str(err.value)
    assert f"{model} does not exist on node " in text and f"Ray node {cluster.node_id('node_a')}" in text
    assert "storage every node mounts at the same path" in text and "repo" not in text.lower()
    assert time.monotonic() - started < 60



def test_a_node_without_the_drivers_toy_world_fails_there_naming_it(cluster, storage, toy_world):
    """A job's toy world is the driver's build on every node: with KDRAY_CACHE_DIR on storage
    that node_a does not see, node_a refuses (naming itself, both sides of the fix) instead of
    training a world of its own; node_b, which sees the copy, resolves the driver's build."""
    import shutil

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kdray import toy
    from kdray.errors import ToyWorldError

    cache = storage / "private" / "kdcache"  # node_a's tmpfs hides it
    shutil.copytree(toy_world.root, cache / "toy" / toy.world_dir_name())
    env = {"KDRAY_CACHE_DIR": str(cache), toy.BUILD_ID_ENV: toy_world.meta["build_id"]}

    def on(name: str, ref: str) -> str:
        task = ray.remote(num_cpus=0, max_retries=0, runtime_env={"env_vars": env})(lambda r: str(toy.resolve(r)))
        strategy = NodeAffinitySchedulingStrategy(cluster.node_id(name), soft=False)
        return ray.get(task.options(scheduling_strategy=strategy).remote(ref), timeout=120)

    assert on("node_b", "toy:teacher") == str(cache / "toy" / toy.world_dir_name() / "teacher")
    with pytest.raises(ToyWorldError) as err:
        on("node_a", "toy:teacher")
    text = str(err.value)
    assert f"Ray node {cluster.node_id('node_a')}" in text and "has no toy world at" in text
    assert toy_world.meta["build_id"] in text and "put KDRAY_CACHE_DIR on storage every node mounts" in text

# -- a job across nodes, and a node lost mid-segment -------------------------------------------

HELDOUT, JUDGED = 32, 12
#: The POCL job's checkpoint interval: every step, so the node can be lost right after stage 2's
#: first step (5) with seven steps of stage 2 still to train.
EVERY = 1


def _pocl_spec(work: Path) -> Path:
    """Two-stage POCL on the toy world with per-round evaluation and the toy teacher as judge;
    checkpoints every EVERY steps and the failure policy's defaults (no max_failures)."""
    from tests.test_e2e_curriculum import small_job

    # The dataset's responses (no teacher pool before the training: CI's minutes go to the
    # training across nodes, the evaluation rounds and the node loss).
    spec = small_job(work, "pocl", dataset_responses=True,
                     objective={"kind": "skew_reverse_kl", "alpha": 0.1, "detach_mixture_student": False},
                     curriculum={"kind": "pocl", "n_stages": 2, "stage_interval": 1},
                     evaluation={
                         "max_new_tokens": 16, "per_round": True,
                         # The toy teacher as judge: mechanics only (it was never trained to judge).
                         # A short template fits its 128 positions.
                         "judge": {"model": {"model": "toy:teacher", "backend": "hf", "dtype": "float32",
                                             "max_model_len": 128},
                                   "reference": "teacher", "max_prompts": JUDGED, "max_new_tokens": 2,
                                   "template": "{prompt}{a}\nB:{b}\nbest:"},
                     })
    config = yaml.safe_load(spec.read_text())
    config["data"]["max_heldout_samples"] = HELDOUT
    # transformers' pools (POCL's difficulty, the evaluation rounds, the judge): on CPU one starts
    # in seconds where a vLLM engine takes half a minute, and what this job is about is the
    # cluster, not the engine (vLLM pools answer in tests/test_e2e.py).
    for role in ("teacher", "student"):
        config[role]["backend"] = "hf"
    # One row a micro-batch: 16 gloo collectives a step, and a checkpoint each step, make stage 2
    # last long enough (seconds) to lose the node between its first checkpoint and its end.
    config["training"].update(checkpoint_every_steps=EVERY, micro_batch_size_per_worker=1)
    assert "max_failures" not in config["training"]
    spec.write_text(yaml.safe_dump(config))
    return spec


def _start_run(cluster, spec: Path, work: Path) -> subprocess.Popen:
    """``kdray run SPEC`` on the cluster, in ``work`` (its stdout.txt and stderr.txt there)."""
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(work / "stdout.txt", "w") as stdout, open(work / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "kdray.cli", "run", str(spec)], cwd=work, env=env,
                                stdout=stdout, stderr=stderr, text=True)


def _train_worker_nodes(cluster, proc: subprocess.Popen, timeout: float = 600) -> list[str]:
    """The nodes of the job's two Ray Train worker processes, once both run (a Ray worker
    process is in the session of the node whose raylet started it)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        workers = [p for p in psutil.process_iter(["pid", "cmdline"])
                   if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        nodes = sorted(filter(None, (cluster.node_of(p.info["pid"]) for p in workers)))
        if len(nodes) == 2:
            return nodes
        assert proc.poll() is None, "the job ended before its training workers started"
        assert time.monotonic() < deadline, f"no two training workers within {timeout} s: {nodes}"
        time.sleep(0.5)


def _wait_for(what: str, found, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (result := found()):
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(poll)
    return result


def _logged(out: Path) -> list[dict]:
    """The job's events so far (a line being written left out)."""
    log = out / "events.jsonl"
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def _phase_started(out: Path, detail: str) -> bool:
    return any(e["kind"] == "phase_start" and detail in e.get("detail", "") for e in _logged(out))


def _checkpointed(out: Path, step: int) -> bool:
    """Whether the job recorded a checkpoint at ``step`` or later (Ray Train registered it)."""
    return any(e["kind"] == "train_step" and e.get("checkpoint") and e["step"] >= step for e in _logged(out))


def _replaced(cluster, lost: str, name: str, proc: subprocess.Popen) -> tuple[float, float]:
    """Wait until the GCS declares the node ``lost`` dead and a node called ``name`` other
    than it is alive; returns when each was first seen (time.time())."""
    dead_at = joined_at = None
    deadline = time.monotonic() + 120
    while dead_at is None or joined_at is None:
        alive = {n["NodeID"]: n for n in cluster.alive_nodes()}
        now = time.time()
        if dead_at is None and lost not in alive:
            dead_at = now
        if joined_at is None and any(name in n["Resources"] for i, n in alive.items() if i != lost):
            joined_at = now
        assert proc.poll() is None or (dead_at and joined_at), "the job ended before the node was replaced"
        assert time.monotonic() < deadline, f"node {lost} dead: {dead_at}, replacement joined: {joined_at}"
        time.sleep(0.2)
    return dead_at, joined_at


#: Seconds between the preemption notice and the reclaim (a short cloud's notice is 30 s).
RECLAIM_S = 45
#: The preemption job's optimizer steps: 1,024 rows, 12 epochs, 32 rows a step (0.2-0.5 s each
#: here): the notice comes early, the reclaim mid-training.
PREEMPT_STEPS = 384


def _preemption_spec(work: Path) -> Path:
    """Forward KL on the dataset's responses, PREEMPT_STEPS steps of one-row micro-batches (16
    gloo collectives a step), and no periodic checkpoints: the only ones before the segment's
    end are the notice's."""
    from tests.test_e2e_curriculum import small_job

    spec = small_job(work, "preempt", dataset_responses=True)
    config = yaml.safe_load(spec.read_text())
    for role in ("teacher", "student"):
        config[role]["backend"] = "hf"
    config["data"]["max_train_samples"] = 1024
    config["training"].update(epochs=12, micro_batch_size_per_worker=1, checkpoint_every_steps=None)
    spec.write_text(yaml.safe_dump(config))
    return spec


def test_a_preemption_notice_checkpoints_at_once_and_before_its_deadline_and_the_job_goes_on(
        cluster, storage, toy_world):
    """A spot instance's reclaim: once training runs, Ray drains one training worker's node for
    a preemption with a deadline (what a cloud's notice becomes; ``ray drain-node``). The workers
    checkpoint at their next check, off the schedule (this job has none), record the notice with
    that step and train on; they checkpoint again shortly before the deadline. At the deadline
    the node is taken and a replacement joins: Ray Train restarts the group from that last
    checkpoint, and the driver says so."""
    from multinode import ray_command

    from tests.test_e2e import _train_steps
    from kdray.train.worker import PREEMPTION_MARGIN_S

    work = storage / "shared" / "preempt"
    work.mkdir(parents=True)
    spec, out = _preemption_spec(work), work / "out"
    proc = _start_run(cluster, spec, work)
    try:
        victim = _train_worker_nodes(cluster, proc)[0]
        _wait_for("step 2", lambda: max(_train_steps(out / "events.jsonl"), default=0) >= 2, proc)
        drained = cluster.node_id(victim)
        noticed_at = time.time()
        subprocess.run([ray_command(), "drain-node", f"--address={cluster.address}", f"--node-id={drained}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
                        f"--deadline-remaining-seconds={RECLAIM_S}"], check=True, timeout=60, capture_output=True)
        saved = _wait_for("the notice's checkpoint", lambda: [e for e in _logged(out) if "preemption" in e], proc)
        saved_in = time.time() - noticed_at
        time.sleep(max(0.0, noticed_at + RECLAIM_S - time.time()))
        taken = max(_train_steps(out / "events.jsonl"))
        cluster.reclaim(victim)  # the cloud takes the node at the deadline; an autoscaler replaces it
        cluster.add_node(victim)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (work / "stdout.txt").read_text() + (work / "stderr.txt").read_text()
    assert rc == 0, output

    notice = saved[0]
    assert notice["kind"] == "train_step" and notice["checkpoint"] is True  # checkpoint_every_steps: null
    assert notice["preemption"]["nodes"] == [drained]
    assert len(notice["preemption"]["ranks"]) == 1 and 0 < notice["preemption"]["deadline_s"] <= RECLAIM_S
    # Ray Train's watcher polls every 5 s, the workers check every PREEMPTION_CHECK_S (5 s), one step more
    assert saved_in < 30, saved_in
    assert 2 <= notice["step"] < taken
    # The last checkpoint before the deadline, at least the margin before it.
    (last,) = [e for e in _logged(out) if "before_deadline_s" in e.get("preemption", {})]
    assert last["checkpoint"] is True and notice["step"] < last["step"] <= taken
    assert PREEMPTION_MARGIN_S - 5 <= last["preemption"]["before_deadline_s"] <= PREEMPTION_MARGIN_S + 1, last
    # The restarted group trained from there: every step once in the report, nothing before it again.
    trained = _train_steps(out / "events.jsonl")
    assert set(trained) == set(range(1, PREEMPT_STEPS + 1))
    restart = next(i for i in range(1, len(trained)) if trained[i] <= trained[i - 1])
    assert trained[restart] == last["step"] + 1, trained[restart - 3:restart + 3]
    said = [e["text"] for e in _logged(out) if e["kind"] == "message"]
    assert any(t.startswith("train: the worker group failed after step ") for t in said), said
    assert f"train: the restarted workers trained from step {last['step'] + 1} on" in said, said
    print(f"\npreemption notice for {victim} after step {notice['step']}: checkpointed {saved_in:.1f} s after the "
          f"drain; again at step {last['step']}, {last['preemption']['before_deadline_s']} s before the reclaim "
          f"(at step {taken}); the restart trained from step {trained[restart]}")


@pytest.mark.slow
def test_pocl_job_trains_across_nodes_scores_each_round_and_finishes_after_losing_a_node(
        cluster, storage, toy_world):
    """The positive control and the node loss in one two-stage POCL job (minutes on CI).

    POCL (difficulty, cumulative stages, schedule values) and the evaluation rounds bring (the
    stage-1 student scored on held-out prompts between the stages; the toy teacher judging the
    final student against the teacher in both orders), trained by two workers on two nodes.
    Stage 2 continues stage 1's state (its steps, its LR schedule, its final checkpoint). Once
    stage 2's first checkpoint is written, the whole node of one training worker is killed and a
    replacement starts: with the defaults of the failure policy Ray Train restarts the worker
    group from that checkpoint and the job finishes with every step recorded once."""
    from tests.test_e2e import _assert_resumed_once, _train_steps, samples
    from tests.test_e2e_curriculum import events, steps
    from tests.test_report import png_size

    from kdray.stages.judge import parse_verdict

    work = storage / "shared" / "pocl"
    work.mkdir(parents=True)
    spec, out = _pocl_spec(work), work / "out"
    proc = _start_run(cluster, spec, work)
    try:
        # Positive control: each stage's two workers run on two worker nodes.
        _wait_for("stage 1's training", lambda: _phase_started(out, "stage 1/2"), proc)
        stage1_nodes = _train_worker_nodes(cluster, proc)
        _wait_for("stage 2's training", lambda: _phase_started(out, "stage 2/2"), proc)
        stage2_nodes = _train_worker_nodes(cluster, proc)
        # Node loss, right after the job recorded stage 2's first checkpoint (step 5).
        _wait_for("stage 2's first checkpoint", lambda: _checkpointed(out, 5), proc, poll=0.05)
        steps_before = _train_steps(out / "events.jsonl")
        victim = stage2_nodes[0]
        killed_at = time.time()
        lost = cluster.kill_node(victim)
        cluster.add_node(victim)  # the replacement an autoscaler starts
        dead_at, joined_at = _replaced(cluster, lost, victim, proc)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (work / "stdout.txt").read_text() + (work / "stderr.txt").read_text()
    assert rc == 0, output
    assert len(set(stage1_nodes)) == len(set(stage2_nodes)) == 2 and set(stage1_nodes + stage2_nodes) <= set(WORKERS)
    assert 5 <= max(steps_before) < 12, f"the node was not lost mid-stage 2: {steps_before}"
    report = json.loads((out / "report.json").read_text())

    # Every step recorded once: a restart at a checkpoint at most, none lost, the report whole.
    _assert_resumed_once(out, EVERY, total=12)
    log = events(out)
    # The restored group's first step resumes from the latest checkpoint recorded before it. The
    # old group may train a step or two between the read of steps_before and the kill taking
    # effect (a slow host), so "latest" is read from the log, not from steps_before.
    trained = [e for e in log if e["kind"] == "train_step" and "loss" in e]
    restart = next((i for i in range(1, len(trained)) if trained[i]["step"] <= trained[i - 1]["step"]), None)
    if restart is None:  # the kill landed between a checkpoint and the next step: training continued
        from kdray.stages.context import DRAIN_INTERVAL_S

        restart = next(i for i, e in enumerate(trained) if e["time"] > killed_at + 2 * DRAIN_INTERVAL_S)
    again = trained[restart]
    checkpointed = [e["step"] for e in log[: log.index(again)] if e["kind"] == "train_step" and e.get("checkpoint")]
    assert again["step"] == max(checkpointed) + 1, (again, checkpointed)  # from the latest checkpoint
    assert again["step"] > 5  # stage 2 (its first checkpoint is step 5), after the kill
    trained_again = again["time"] - killed_at
    print(f"\nnode {victim} lost after step {max(steps_before)}: declared dead after {dead_at - killed_at:.1f} s, "
          f"replacement joined after {joined_at - killed_at:.1f} s, training again (step {again['step']}) after "
          f"{trained_again:.1f} s; workers on {stage1_nodes} (stage 1), {stage2_nodes} (stage 2)")

    phases = [e["phase"] for e in log if e["kind"] == "phase_end"]
    assert phases == ["prepare", "generate", "score", "train", "evaluate", "train", "evaluate", "evaluate", "report"]

    # The measurement is stored with the data: every row once, easy -> hard by fused rank.
    import pyarrow.parquet as pq

    records = pq.read_table(out / "curriculum" / "difficulty.parquet").to_pylist()
    assert [r["position"] for r in records] == list(range(256))
    assert len({r["key"] for r in records}) == 256
    rrf = [r["rrf"] for r in records]
    assert rrf == sorted(rrf, reverse=True)
    for r in records:
        assert r["rrf"] == pytest.approx(1 / (60 + r["rank_rouge_l"]) + 1 / (60 + r["rank_ce"]))
    assert records[0]["ce"] < records[-1]["ce"] and records[0]["rouge_l"] >= records[-1]["rouge_l"]

    # Stage 1: the easiest 128 rows (4 steps of 32) at T=1, kd_ratio 0.7; stage 2: all 256
    # rows (8 steps) at T=2, kd_ratio 1.0. One optimizer and one LR schedule throughout.
    m = steps(out)
    assert [s["step"] for s in m] == list(range(1, 13))
    assert [s["stage"] for s in m] == [1] * 4 + [2] * 8
    assert [s["n_active"] for s in m] == [128] * 4 + [256] * 8
    assert [s["kd_temperature"] for s in m] == [1.0] * 4 + [2.0] * 8
    assert [s["kd_ratio"] for s in m] == [0.7] * 4 + [1.0] * 8
    assert all("ce" in s for s in m[:4]) and not any("ce" in s for s in m[4:])
    lrs = [s["lr"] for s in m]
    assert lrs[1] == max(lrs) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # no restart at stage 2
    plan = report["plan"]
    assert [(p["stage"], p["n_rows"], p["steps"]) for p in plan] == [(1, 128, 4), (2, 256, 8)]
    # Stage 2 started from stage 1's final state: a checkpoint of stage 1's run, at step 4.
    state = json.loads((out / "state" / "job.json").read_text())
    first = Path(state["segments"]["0"]["checkpoint"])
    assert first.parent.name == state["runs"]["0"] != state["runs"]["1"]
    assert json.loads((first / "progress.json").read_text())["step"] == 4

    # Round 1 (the stage-1 student) is scored; the last stage's student is student_after.
    ev = report["evaluation"]
    assert list(ev) == ["teacher", "student_before", "student_round_1", "student_after"]
    for label, scores in ev.items():
        assert scores["n"] == HELDOUT and 0.0 <= scores["rougeL"] <= 1.0 and 0.0 <= scores["exact_match"] <= 1.0
        written = samples(out, label)  # written by the pools' tasks, scored per row there
        assert len(written) == HELDOUT and [r["_row"] for r in written] == sorted(r["_row"] for r in written)
        assert scores["exact_match"] == pytest.approx(sum(r["exact_match"] for r in written) / HELDOUT)
    assert ev["teacher"]["exact_match"] > ev["student_before"]["exact_match"]
    # Each round against the one before it, prompt by prompt, besides the after-before and after-teacher pairs.
    paired = report["paired_differences"]
    assert list(paired) == ["student_after - student_before", "student_after - teacher",
                            "student_round_1 - student_before", "student_after - student_round_1"]
    rouge = {label: {r["_row"]: r["rougeL"] for r in samples(out, label)} for label in ev}
    for pair, d in paired.items():
        a, _, b = pair.partition(" - ")
        assert d["n"] == HELDOUT
        assert d["rougeL"] == pytest.approx(statistics.fmean(rouge[a][r] - rouge[b][r] for r in rouge[b]))
    # Scored right after stage 1: between the stage-1 training and stage 2's.
    ends = [(e["phase"], e.get("detail", "")) for e in log if e["kind"] == "phase_end"]
    names = [p for p, _ in ends]
    first_eval = names.index("evaluate")
    assert names[first_eval - 1] == "train" and names[first_eval + 1] == "train"
    assert "stage 1/2" in ends[first_eval][1]
    assert state["round_scores"]["0"] == ev["student_round_1"]  # kept for a resumed run

    # The rounds plot exists and is a real image; report.md shows it and the judge.
    width, height = png_size(out / "evaluation_rounds.png")
    assert width >= 800 and height >= 250
    md = (out / "report.md").read_text()
    assert "](evaluation_rounds.png)" in md and "| student round 1 |" in md and "## LLM judge" in md

    # The judge: both orders of every judged prompt, rates in [0, 1], ties from unparseable output.
    judge = report["judge"]
    assert judge["model"] == "toy:teacher" and judge["reference"] == "teacher"
    assert judge["items"] + judge["skipped_too_long"] == JUDGED
    assert judge["comparisons"] == 2 * judge["items"] > 0
    assert judge["wins"] + judge["losses"] + judge["ties"] == judge["comparisons"]
    for key in ("win_rate", "position_consistency", "first_position_bias", "second_position_bias"):
        assert 0.0 <= judge[key] <= 1.0
    items = samples(out, "judge")  # one row per judged prompt: its verdict in each order
    assert len(items) == judge["items"]
    assert {r["id"] for r in items} <= {r["id"] for r in samples(out, "student_after")}
    verdicts = [(r[f"{order}_verdict"], r[f"{order}_output"], r[f"{order}_judge_prompt"])
                for r in items for order in ("student_first", "student_second")]
    assert all(v == parse_verdict(text) and prompt for v, text, prompt in verdicts)
    assert sum(v is None for v, _, _ in verdicts) == judge["ties"]
    # The win rate's error: over the prompts, each scoring its two verdicts' wins (a tie as half) / 2.
    per_prompt = [((r["student_first_verdict"] == "A") + (r["student_second_verdict"] == "B")
                   + ((r["student_first_verdict"] is None) + (r["student_second_verdict"] is None)) / 2) / 2
                  for r in items]
    assert judge["win_rate"] == pytest.approx(statistics.fmean(per_prompt))
    assert judge["win_rate_stderr"] == pytest.approx(statistics.stdev(per_prompt) / len(per_prompt) ** 0.5)
    judged = re.search(r"judge toy:teacher: student after vs teacher: win rate (\S+) ± (\S+) over",
                       (work / "stdout.txt").read_text())
    assert judged and float(judged[1]) == pytest.approx(judge["win_rate"], abs=5e-4)
    assert float(judged[2]) == pytest.approx(judge["win_rate_stderr"], abs=5e-4)
