"""Paths in a job spec and on the nodes: URIs refused everywhere a spec arrives, the rule that
tells a local model directory from a hub id (a missing directory names the node, never a hub
lookup), the toy world's build id checked where it is loaded, and node-local compile caches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from kdray.errors import ModelError
from kdray.spec import parse_spec
from kdray.spec.refs import is_local_model_path
from specs import errors_of, minimal

REPO = Path(__file__).resolve().parents[1]
MOUNT_FIX = "Mount the bucket at the same path on every node"


# -- URIs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["s3://bucket/runs/x", "gs://b/x", "hdfs://nn:8020/x", "S3://bucket/x"])
def test_a_uri_output_dir_is_refused_naming_the_field_the_value_and_the_fix(uri):
    errs = errors_of(minimal(output_dir=uri))
    assert set(errs) == {"output_dir"}
    assert repr(uri) in errs["output_dir"] and "does not support" in errs["output_dir"]
    assert MOUNT_FIX in errs["output_dir"] and "Ray Train's storage_path" in errs["output_dir"]


def test_a_file_uri_output_dir_is_refused_with_its_local_path_and_a_path_is_kept_as_written():
    errs = errors_of(minimal(output_dir="file:///shared/runs/x"))
    assert "write the local path itself: '/shared/runs/x'" in errs["output_dir"]
    # a colon inside a path is no URI
    assert parse_spec(minimal(output_dir="runs/a:b")).output_dir == "runs/a:b"
    assert "is empty" in errors_of(minimal(output_dir=" "))["output_dir"]


def test_uri_model_and_data_references_are_refused_as_uris(tmp_path):
    errs = errors_of(minimal(teacher={"model": "s3://bucket/qwen"}, data={"train": "gs://b/train.jsonl",
                                                                        "heldout": "toy:heldout"}))
    assert "'s3://bucket/qwen' is a s3:// URI" in errs["teacher.model"] and MOUNT_FIX in errs["teacher.model"]
    assert "'gs://b/train.jsonl' is a gs:// URI" in errs["data.train"] and MOUNT_FIX in errs["data.train"]
    assert parse_spec(minimal(data={"train": "hub:org/name:train[:10]", "heldout": "toy:heldout"}))


def _spec_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "uri.yaml"
    path.write_text(yaml.safe_dump(minimal(**overrides)))
    return path


@pytest.mark.parametrize("command", ["validate", "run"])
def test_kdray_validate_and_run_refuse_a_uri_output_dir_without_a_traceback(tmp_path, command):
    spec = _spec_file(tmp_path, output_dir="s3://bucket/runs/t")
    res = subprocess.run([sys.executable, "-m", "kdray.cli", command, str(spec)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    text = " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr
    assert "output_dir: 's3://bucket/runs/t' is a s3:// URI" in text and MOUNT_FIX in text
    assert not (tmp_path / "s3:").exists()  # the old trap: <cwd>/s3:/bucket/runs/t


def test_the_service_answers_a_uri_output_dir_with_422_naming_the_field(tmp_path):
    from kdray.service.app import ServiceConfig, build_app

    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    with TestClient(build_app(config)) as client:
        auth = {"Authorization": "Bearer t"}
        for uri in ("s3://bucket/runs/t", "file:///etc/x"):
            res = client.post("/v1/jobs", json=minimal(output_dir=uri), headers=auth)
            assert res.status_code == 422, res.text
            errors = res.json()["errors"]
            assert [e["field"] for e in errors] == ["output_dir"] and "URI" in errors[0]["message"]
        res = client.post("/v1/jobs", content=yaml.safe_dump(minimal(output_dir="gs://b/x")),
                          headers={**auth, "Content-Type": "application/yaml"})
        assert res.status_code == 422 and MOUNT_FIX in res.json()["errors"][0]["message"]
    assert not (tmp_path / "runs" / "s3:").exists() and not (tmp_path / "runs" / "gs:").exists()


# -- local model paths vs hub ids ----------------------------------------------------------------

def test_the_rule_that_tells_a_local_model_path_from_a_hub_id():
    local = ["/models/qwen", "./qwen", "../qwen", "~/qwen", "models/qwen/v2", "qwen", "a\\b"]
    hub = ["Qwen/Qwen2.5-0.5B", "org/name", "org/name.v1"]
    assert [r for r in local if not is_local_model_path(r)] == []
    assert [r for r in hub + ["toy:student"] if is_local_model_path(r)] == []


def test_an_org_name_that_is_also_a_directory_here_is_refused_as_ambiguous(tmp_path, monkeypatch):
    (tmp_path / "models" / "student").mkdir(parents=True)
    (tmp_path / "models" / "student" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    errs = errors_of(minimal(student={"model": "models/student"}))
    assert "both a hub id and a directory here" in errs["student.model"]
    assert "'./models/student'" in errs["student.model"]
    assert parse_spec(minimal(student={"model": "./models/student"})).student.model == str(tmp_path / "models" / "student")


def test_relative_model_and_data_paths_become_the_absolute_paths_they_name(tmp_path, monkeypatch):
    """Taken from the working directory (the service's: its base_dir) once, at validation: Ray
    Train's workers and the pools run in Ray's own directories, where './student' named nothing
    (a job that validated failed in its train stage), and the spec saved in output_dir then
    reproduces the job from any directory."""
    import json

    from kdray.spec import dump_spec

    (tmp_path / "models" / "student").mkdir(parents=True)
    (tmp_path / "models" / "student" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"id": "a", "prompt": "p"}) + "\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rel = minimal(student={"model": "../models/student"}, data={"train": "../data/train.jsonl", "heldout": "toy:heldout"})
    spec = parse_spec(rel)
    assert spec.student.model == str(tmp_path / "models" / "student")
    assert spec.data.train == str(tmp_path / "data" / "train.jsonl") and spec.data.heldout == "toy:heldout"
    assert spec.teacher.model == "toy:teacher"
    again = yaml.safe_load(dump_spec(spec))
    monkeypatch.chdir(tmp_path)  # the saved spec means the same from another directory
    assert parse_spec(again) == spec
    # The service takes them from its working directory, wherever its replica runs.
    via = parse_spec(minimal(student={"model": "./models/student"}), base_dir=str(tmp_path))
    assert via.student.model == str(tmp_path / "models" / "student")
    # A missing relative path says where it was looked for; a file is not a model directory.
    errs = errors_of(minimal(student={"model": "./student"}, data={"train": "train.jsonl", "heldout": "toy:heldout"}))
    assert f"looked for {tmp_path / 'student'}" in errs["student.model"]
    assert f"looked for {tmp_path / 'train.jsonl'}" in errs["data.train"]
    errs = errors_of(minimal(student={"model": "./models/student/config.json"}))
    assert "is a file; give the directory save_pretrained wrote" in errs["student.model"]
    assert str(tmp_path / "models" / "student") in errs["student.model"]


def test_the_service_takes_relative_paths_from_its_working_directory(tmp_path, monkeypatch):
    from kdray.service.app import ServiceConfig, build_app

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)  # the replica's directory is not the service's working directory
    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1", workdir=str(tmp_path / "work"))
    with TestClient(build_app(config)) as client:
        res = client.post("/v1/jobs", json=minimal(student={"model": "./models/student"}),
                          headers={"Authorization": "Bearer t"})
    assert res.status_code == 422, res.text
    [error] = res.json()["errors"]
    assert error["field"] == "student.model" and f"looked for {tmp_path / 'work' / 'models' / 'student'}" in error["message"]


def test_a_local_model_path_missing_on_this_node_names_the_node_never_the_hub(tmp_path):
    from kdray.errors import node
    from kdray.models import check_model_files, load_tokenizer, resolve_model, vocab_size

    assert resolve_model("org/name") == "org/name"  # a hub id is left to the library
    missing = tmp_path / "gone" / "student"
    for call in (resolve_model, check_model_files, load_tokenizer, vocab_size):
        with pytest.raises(ModelError) as info:
            call(str(missing))
        msg = str(info.value)
        assert f"{missing} does not exist on node {node()}" in msg, call
        assert "storage every node mounts" in msg and "repo" not in msg.lower(), msg
        assert info.value.__context__ is None or not isinstance(info.value.__context__, OSError)
    with pytest.raises(ModelError, match="relative to this process's directory"):
        resolve_model("./no-such-model-dir")


# -- the toy world's build id ----------------------------------------------------------------

@pytest.fixture
def two_worlds(toy_world, tmp_path):
    """The real toy world's cache, and a copy of it (hard links) as another build would leave
    it: the same files under another build id."""
    import json
    import os
    import shutil

    from kdray import toy

    other = tmp_path / "other-cache"
    copy = other / toy_world.root.name
    shutil.copytree(toy_world.root, copy, copy_function=os.link)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").unlink()  # a link to the real world's file: write a new one
    (copy / "meta.json").write_text(json.dumps({**meta, "build_id": "0" * 32}))
    return toy.cache_root(), other


def test_a_node_with_another_toy_build_or_none_fails_naming_the_node_and_the_fix(two_worlds, tmp_path, monkeypatch):
    from kdray import toy
    from kdray.errors import ToyWorldError, node

    driver, other = two_worlds
    expected = toy.build_toy_world(driver).meta["build_id"]
    assert expected != "0" * 32
    monkeypatch.setenv(toy.BUILD_ID_ENV, expected)
    assert toy.resolve("toy:teacher", cache_dir=driver) == driver / toy.world_dir_name() / "teacher"
    with pytest.raises(ToyWorldError) as info:
        toy.resolve("toy:student", cache_dir=other)
    msg = str(info.value)
    assert f"node {node()} has the toy world" in msg and f"of build {'0' * 32}" in msg and expected in msg
    assert "put KDRAY_CACHE_DIR on storage every node mounts" in msg
    empty = tmp_path / "empty-cache"
    with pytest.raises(ToyWorldError, match=f"node .* has no toy world at {empty}"):
        toy.resolve("toy:train", cache_dir=empty)
    assert not empty.exists() or not any(empty.iterdir()), "a node inside a job must not build its own world"
    # Through the model loader, the same error (not a hub lookup, not a load failure).
    monkeypatch.setenv(toy.BUILD_ID_ENV, "f" * 32)
    from kdray.models import load_tokenizer

    with pytest.raises(ToyWorldError, match=f"resolved the build {'f' * 32}"):
        load_tokenizer("toy:student")


def test_the_driver_pins_its_toy_world_for_a_toy_job_only(toy_world, monkeypatch):
    from kdray import toy

    monkeypatch.setenv(toy.BUILD_ID_ENV, "stale")
    monkeypatch.setenv(toy.BUILD_ID_ENVS["grammar"], "stale")
    assert toy.pin_for_job(["org/name", "/data/train.jsonl"]) == {}
    assert not set(toy.BUILD_ID_ENVS.values()) & set(os.environ)
    assert toy.pin_for_job(["org/name", "toy:heldout"]) == {"toy": toy_world.meta["build_id"]}
    assert os.environ[toy.BUILD_ID_ENV] == toy_world.meta["build_id"]
    toy.unpin()
    assert toy.BUILD_ID_ENV not in os.environ
