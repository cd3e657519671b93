"""Committed datasets under a job's output directory (kdray.data.artifacts): whole or absent,
read back in their stored order, and a damaged one named with the fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kdray.data.artifacts import MARKER, committed, open_artifact, write_dataset
from kdray.errors import KdrayError


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


def test_a_dataset_is_committed_whole_and_read_back_in_its_stored_order(ray_local, tmp_path):
    import ray.data

    path = tmp_path / "datasets" / "rows"
    (tmp_path / "datasets" / ".rows.partial-dead").mkdir(parents=True)  # what a killed writer left
    assert open_artifact(path, "rows") is None
    ds = ray.data.range(1000, override_num_blocks=7).map_batches(lambda b: {"key": b["id"] * 3}, batch_format="numpy")
    done = write_dataset(ds, path, "rows", {"what": "test"})
    assert not list((tmp_path / "datasets").glob(".rows.partial-*"))
    assert done.rows == 1000 and done.meta == {"what": "test"} and done.info["columns"] == ["key"]
    assert len(done.info["files"]) > 1 and done.info["bytes"] > 0
    again = open_artifact(path, "rows")
    first = done.column("key")
    assert sorted(first.tolist()) == list(range(0, 3000, 3))
    assert np.array_equal(again.column("key"), first)  # the same order every time it is read
    read = [int(v) for batch in again.read().iter_batches(batch_format="numpy") for v in batch["key"]]
    assert read == first.tolist()


def test_a_dataset_without_the_planned_row_count_is_not_committed(ray_local, tmp_path):
    """A pool that lost (or repeated) rows would leave the plan's steps wrong: nothing is
    committed, the partial directory goes, and the message says what to do."""
    import ray.data

    path = tmp_path / "records"
    ds = ray.data.range(10).filter(lambda row: row["id"] != 3)  # a row lost on the way
    with pytest.raises(KdrayError, match=r"made 9 rows where the job planned 10, so nothing was committed.*again"):
        write_dataset(ds, path, "records", expect_rows=10)
    assert not path.exists() and not list(tmp_path.glob(".records.partial-*"))
    assert write_dataset(ray.data.range(10), path, "records", expect_rows=10).rows == 10


def test_a_damaged_dataset_names_the_directory_and_the_fix(tmp_path):
    path = tmp_path / "rows"
    path.mkdir()
    (path / MARKER).write_text("{cut")
    with pytest.raises(KdrayError, match=rf"{MARKER} is not a readable JSON file .*delete {path}"):
        committed(path, "rows")
    (path / MARKER).write_text(json.dumps({"format": 1, "kind": "rows", "files": ["a.parquet"], "rows": 1}))
    with pytest.raises(KdrayError, match=r"1 of its 1 files are missing \(first: a.parquet\).*--restart"):
        committed(path, "rows")
    (path / "a.parquet").write_bytes(b"")
    with pytest.raises(KdrayError, match=r"holds a 'rows' dataset, not 'records'"):
        committed(path, "records")
    assert committed(path, "rows")["rows"] == 1


def test_reading_in_order_leaves_the_drivers_data_context_alone(ray_local, tmp_path):
    import ray.data
    from ray.data import DataContext

    done = write_dataset(ray.data.range(10), tmp_path / "r", "rows")
    assert done.read().context.execution_options.preserve_order
    assert not DataContext.get_current().execution_options.preserve_order


def test_reading_leaves_the_drivers_parquet_reader_setting_alone(ray_local, tmp_path):
    import ray.data
    from ray.data import DataContext

    done = write_dataset(ray.data.range(10), tmp_path / "r", "rows")
    before = DataContext.get_current().use_datasource_v2
    assert done.read().count() == 10
    assert DataContext.get_current().use_datasource_v2 == before


def test_a_run_whose_workers_take_every_cpu_is_refused_before_it_would_hang(ray_local):
    from kdray.errors import ClusterError
    from kdray.stages.train import check_ingest_cpus

    check_ingest_cpus(1)  # one CPU left for the reads that stream the data
    with pytest.raises(ClusterError, match=r"num_workers is 2 and the Ray cluster has 2 CPUs.*Lower training.num_workers"):
        check_ingest_cpus(2)


def test_a_pool_task_holds_a_bounded_share_of_large_outputs_however_many_rows(ray_local, tmp_path):
    """A pool's actor task takes a whole input block, and a committed dataset's read blocks
    grow with its rows (Ray Data splits a read into a few blocks per CPU), so one scorer task
    would hold ever more batches of records in the object store (kdray bench scale: 510 MiB
    spilled at 1,000 hidden rows, none at 125). With ``row_bytes`` the input is cut so a task's
    outputs fit TASK_OUTPUT_BYTES, in whole batches."""
    import ray.data

    from kdray.pools.run import TASK_OUTPUT_BYTES, pool_map
    from kdray.spec import GenerationSpec

    class TaskRows:  # a pool stand-in
        def __call__(self, batch):
            return {"id": batch["id"]}

    stored = write_dataset(ray.data.range(2000, override_num_blocks=1), tmp_path / "rows", "rows")
    assert len(stored.info["files"]) == 1  # read as a few blocks of hundreds of rows
    pool = GenerationSpec(replicas=1, num_cpus_per_replica=0.5, batch_size=32)

    def tasks(row_bytes):
        done = pool_map(stored.read(), TaskRows, pool, "scorer", row_bytes=row_bytes).materialize()
        assert sorted(int(r["id"]) for r in done.take_all()) == list(range(2000))  # every row once
        return int(re.search(r"MapBatches\(TaskRows\): (\d+) tasks executed", done.stats()).group(1))

    # Rows of 1/32 of the bound: a batch per task (blocks of <= 32 rows; Ray Data bundles small
    # ones up to a batch, so at most about two batches each), not hundreds of rows.
    assert tasks(TASK_OUTPUT_BYTES // 32) >= 2000 // 64
    # Rows 4x smaller: blocks of four batches.
    assert 2000 // (2 * 128) <= tasks(TASK_OUTPUT_BYTES // 128) < 2000 // 64
    # Small outputs (a generator's): the blocks as read.
    assert tasks(None) < 2000 // 256

    # What a pool of large rows, and its write, may hold in the object store: two task outputs
    # per replica, whatever the rows; Ray Data's own budget (a share of the store) elsewhere.
    from kdray.pools.run import store_budget

    four = GenerationSpec(replicas=4, num_cpus_per_replica=0.5, batch_size=32)
    assert store_budget(four) == 2 * 4 * TASK_OUTPUT_BYTES
    limits = lambda ds: ds.context.execution_options.resource_limits.object_store_memory  # noqa: E731
    capped = pool_map(stored.read(), TaskRows, four, "scorer", row_bytes=1024)
    assert limits(capped) == store_budget(four)
    assert limits(pool_map(stored.read(), TaskRows, four, "generator")) == float("inf")  # Ray's default
    from ray.data import DataContext

    assert DataContext.get_current().execution_options.resource_limits.object_store_memory == float("inf")  # the
    # driver's own context is left as it was: other executions keep Ray Data's budget


def test_the_training_ingest_reads_blocks_of_bounded_bytes_however_large_the_files(ray_local, tmp_path):
    """The blocks streamed to the training workers are held in the object store while queued
    and prefetched; Ray Data's default reads a file as blocks of up to 128 MiB."""
    import ray.data

    from kdray.stages.train import INGEST_BLOCK_BYTES, training_dataset

    row = 2**20  # a hidden record's size (H = 3584 bf16 at ~150 tokens)

    def rows(batch):
        n = len(batch["id"])
        return {"key": batch["id"].astype(str), "input_ids": np.zeros((n, row // 4), np.int32),
                "prompt_len": batch["id"].astype(np.int32)}  # the row number, to check the order

    stored = write_dataset(ray.data.range(48, override_num_blocks=1).map_batches(rows, batch_format="numpy"),
                           tmp_path / "big", "responses")
    assert len(stored.info["files"]) == 1  # 48 MiB in one file, one read task
    ds = training_dataset(stored)
    sizes = [bundle.size_bytes() for bundle in ds.iter_internal_ref_bundles()]
    assert sum(sizes) >= 48 * row and len(sizes) >= 48 * row // INGEST_BLOCK_BYTES
    assert max(sizes) <= 2 * INGEST_BLOCK_BYTES
    assert [int(k) for b in ds.iter_batches(batch_format="numpy") for k in b["prompt_len"]] == list(range(48))


def test_files_keep_their_write_order_past_ten_files_a_task():
    """Ray Data names a task's files NAME-0 … NAME-10 unpadded: the committed order is by number,
    not by text (where -10 comes before -2), so a split's files stay in row order."""
    from kdray.data.artifacts import file_order

    names = [f"uuid7_{task:06d}-{i}.parquet" for task in range(2) for i in range(12)]
    assert [p.name for p in sorted((Path(n) for n in reversed(names)), key=file_order)] == names
