"""What a job does when training fails, by default: checkpoints every 200 steps and up to two
restarts of the worker group a segment (a lost node costs at most the steps since the latest
checkpoint), but never a retry of an error kdray raised in a worker, which would only repeat.
The node loss itself is tested on a real cluster in tests/test_multinode_cluster.py."""

from __future__ import annotations

import pytest

from kdray.errors import DataError, user_error
from kdray.spec import parse_spec
from kdray.stages.train import worker_user_error
from tests.specs import errors_of, minimal


def test_a_spec_without_failure_settings_checkpoints_and_retries():
    t = parse_spec(minimal()).training
    assert (t.checkpoint_every_steps, t.max_failures) == (200, 2)


def test_the_failure_settings_can_be_turned_off_and_are_checked():
    t = parse_spec(minimal(training={"checkpoint_every_steps": None, "max_failures": 0})).training
    assert (t.checkpoint_every_steps, t.max_failures) == (None, 0)
    assert parse_spec(minimal(training={"max_failures": -1})).training.max_failures == -1
    errors = errors_of(minimal(training={"checkpoint_every_steps": 0, "max_failures": -2}))
    assert set(errors) == {"training.checkpoint_every_steps", "training.max_failures"}
    # The message says how to get what a user trying 0 or -2 wants.
    assert "0 is not an interval" in errors["training.checkpoint_every_steps"]
    assert "or null to save only each segment's final state" in errors["training.checkpoint_every_steps"]
    assert "-2 is not a number of restarts" in errors["training.max_failures"]
    assert "or -1 to retry forever" in errors["training.max_failures"]
    # YAML's true and false are not numbers (pydantic would take them for 1 and 0).
    errors = errors_of(minimal(training={"checkpoint_every_steps": True, "max_failures": False}))
    assert errors["training.checkpoint_every_steps"].startswith("true is not an interval")
    assert errors["training.max_failures"].startswith("false is not a number of restarts")


def test_only_an_error_kdray_raised_in_a_worker_stops_the_retries():
    from ray.exceptions import ActorDiedError

    bad = DataError("data.train: 3 rows are bad; fix them")
    assert worker_user_error(bad) is bad  # the object, as Ray Train's controller receives it
    text = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                        "kdray.errors.ModelError: the student does not load; fix its path")
    assert worker_user_error(text) is None  # not Ray's: a traceback's text is trusted from Ray only
    # A lost node (the worker's actor died with it), a collective broken by it, a kdray bug: retried.
    assert worker_user_error(ActorDiedError()) is None
    assert worker_user_error(RuntimeError("[gloo] Connection closed by peer")) is None
    assert worker_user_error(KeyError("a bug")) is None


def test_the_driver_finds_the_error_that_stopped_the_retries():
    from ray.train import ControllerError

    bad = DataError("data.train: 3 rows are bad; fix them")
    assert user_error(ControllerError(bad)) is bad
    assert user_error(ControllerError(KeyError("a bug"))) is None


@pytest.mark.slow
def test_a_kdray_error_in_a_worker_fails_the_run_once_though_retries_are_allowed(ray_cpus, tmp_path):
    """Real Ray Train (2 gloo workers, max_failures 2): a DataError raised by rank 1 ends the run
    after one attempt and reaches the driver as itself; a bug is retried twice."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kdray.stages.context import progress_hub
    from kdray.stages.train import train_metrics_callback

    def train(config):
        import ray.train

        with open(config["attempts"], "a") as fh:
            fh.write("x")
        if ray.train.get_context().get_world_rank() == 1:
            if config["kind"] == "user":
                raise DataError("data.train: 3 rows are bad; fix them")
            raise KeyError("a bug")

    hubs = {}

    def run(kind: str) -> tuple[Exception, int]:
        attempts = tmp_path / f"{kind}.txt"
        attempts.write_text("")
        hubs[kind] = progress_hub()
        trainer = TorchTrainer(
            train, train_loop_config={"attempts": str(attempts), "kind": kind},
            scaling_config=ScalingConfig(num_workers=2), torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name=kind, storage_path=str(tmp_path / "ray_train"),
                                 callbacks=[train_metrics_callback(hubs[kind], 2)],
                                 failure_config=FailureConfig(max_failures=2)))
        with pytest.raises(Exception) as info:
            trainer.fit()
        return info.value, len(attempts.read_text()) // 2  # each attempt starts both workers

    import ray

    error, attempts = run("user")
    assert attempts == 1
    assert isinstance(user_error(error), DataError) and "3 rows are bad" in str(user_error(error))
    assert ray.get(hubs["user"].drain.remote()) == []  # not retried: nothing to say of a restart
    error, attempts = run("bug")
    assert attempts == 3 and user_error(error) is None
    # The driver is told of each failure once (Ray Train polls a failed group until it decides),
    # its rank, its error's line and what comes next.
    said = [e["message"] for e in ray.get(hubs["bug"].drain.remote())]
    failed = "train: the worker group failed before its first step (rank 1: KeyError: 'a bug'); "
    assert said == [failed + "Ray Train restarts it from the latest checkpoint (failure 1 of training.max_failures 2)",
                    failed + "Ray Train restarts it from the latest checkpoint (failure 2 of training.max_failures 2)",
                    failed + "training.max_failures (2) is used up: the segment fails"], said
