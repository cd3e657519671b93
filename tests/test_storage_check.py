"""The shared-storage check (kdray.pipeline.storage) on a plain local Ray: one node, one task.

The cases only a cluster has (a node that does not see output_dir) are in
tests/test_multinode_cluster.py.
"""

from __future__ import annotations

import time

import pytest

from kdray.errors import ClusterError, SharedStorageError
from kdray.pipeline.storage import MARKER_PREFIX, check_shared_storage


def test_one_local_node_passes_and_leaves_nothing(ray_cpus, tmp_path):
    import ray

    (tmp_path / "keep.txt").write_text("x")
    started = time.monotonic()
    nodes = check_shared_storage(tmp_path)
    elapsed = time.monotonic() - started
    assert [n.node_id for n in nodes] == [ray.get_runtime_context().get_node_id()]
    assert nodes[0].hostname and nodes[0].ip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # marker and reply removed
    again = time.monotonic()
    check_shared_storage(tmp_path)
    assert time.monotonic() - again < 5, "a second check on a warm Ray should cost one tiny task"
    assert elapsed < 30


def test_a_node_that_does_not_answer_in_time_fails_the_check(ray_cpus, tmp_path):
    import ray

    with pytest.raises(SharedStorageError) as err:
        check_shared_storage(tmp_path, timeout_s=0)
    text = str(err.value)
    assert isinstance(err.value, ClusterError)
    assert ray.get_runtime_context().get_node_id() in text
    assert "did not run the check within 0 s" in text and str(tmp_path) in text
    assert "mount the same shared filesystem at the same path on every node" in text
    assert not list(tmp_path.glob(MARKER_PREFIX + "*"))
