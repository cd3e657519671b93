"""Light per-row work in Ray Data tasks that build their callable once per worker process
(kdray.data.light_tasks): the job's tokenizing and request encoding run this way."""

from __future__ import annotations

import os

import numpy as np

from kdray.data import light_tasks
from kdray.data.light_tasks import MAX_BUILT, cached_instance, map_light


class Offset:
    """Adds ``by`` to ``x``; each construction appends its process id to ``log`` (if given)."""

    def __init__(self, by: int, log: str | None = None):
        if log:
            with open(log, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        self.by = by

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": batch["x"] + self.by, "pid": np.full(len(batch["x"]), os.getpid())}


def test_equal_arguments_share_one_instance_and_the_oldest_goes_past_the_limit(monkeypatch):
    monkeypatch.setattr(light_tasks, "_BUILT", {})
    first = cached_instance(Offset, {"by": 1})
    assert cached_instance(Offset, {"by": 1}) is first
    assert cached_instance(Offset, {"by": 2}) is not first
    for by in range(3, MAX_BUILT + 2):  # MAX_BUILT more: {"by": 1} is the oldest, and goes
        cached_instance(Offset, {"by": by})
    assert len(light_tasks._BUILT) == MAX_BUILT
    assert cached_instance(Offset, {"by": 1}) is not first


def test_tasks_build_the_callable_once_per_worker_process(ray_cpus, tmp_path, caplog):
    import logging
    import sys

    import ray.data
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    log = tmp_path / "built.txt"
    ds = ray.data.range(64, override_num_blocks=16).map_batches(lambda b: {"x": b["id"]}, batch_format="numpy")
    util_log = logging.getLogger("ray.data._internal.util")  # where Ray Data warns of deprecated arguments
    util_log.addHandler(caplog.handler)
    try:
        rows = map_light(ds, Offset, {"by": 10, "log": str(log)}, num_cpus=0.25, concurrency=2, batch_size=4,
                         batch_format="numpy").take_all()
    finally:
        util_log.removeHandler(caplog.handler)
    assert not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert sorted(int(r["x"]) for r in rows) == list(range(10, 74))
    built = log.read_text().split()
    # 16 batches, one construction in each process that ran any
    assert sorted(built) == sorted({str(int(r["pid"])) for r in rows})
    assert len(built) < 16
