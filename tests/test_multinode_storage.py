"""A job's output_dir checked on every node of a real three-node Ray cluster (tests/multinode.py).

The cluster's worker node ``node_a`` has ``STORAGE/private`` covered by an empty tmpfs of its
own: an output_dir under it is what a node without the shared mount sees. The check must name
that node, the path and the fix, before any stage runs, in the Python API and through
``kdray run`` (also when Ray Train would retry forever, ``training.max_failures: -1``). A model
directory under it, loaded on ``node_a``, fails there with an error naming that node, not as a
hub id.
"""

from __future__ import annotations

import json
import os
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


def test_the_cluster_has_a_cpu_less_head_two_named_workers_and_a_private_path(cluster, storage):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 3
    assert {n["NodeID"]: n["Resources"].get("CPU", 0) for n in nodes} == {
        cluster.node_id("head"): 0, **{cluster.node_id(name): 1 for name in WORKERS}}
    seen = storage / "private" / "seen-by-two.txt"
    seen.write_text("x")
    assert {name: _exists_on(cluster.node_id(name), seen) for name in ("head", *WORKERS)} == {
        "head": True, "node_a": False, "node_b": True}


def test_a_shared_output_dir_passes_on_every_node(cluster, storage):
    from kdray.pipeline.storage import MARKER_PREFIX, check_shared_storage

    out = storage / "shared" / "job"
    out.mkdir(parents=True)
    nodes = check_shared_storage(out)
    ids = [n.node_id for n in nodes]
    assert len(set(ids)) == len(ids) == 3
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

    model = storage / "private" / "student"  # node_a's tmpfs hides it; head and node_b see it
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
