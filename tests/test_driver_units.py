"""Driver pieces that need no cluster: reusing a stored POCL difficulty measurement."""

from __future__ import annotations

import json

from kdray.data.difficulty import read_difficulty as _read_difficulty


def write(path, keys_in_order, student="toy:student"):
    path.write_text("".join(json.dumps({"key": k, "position": i, "student": student}) + "\n"
                            for i, k in enumerate(keys_in_order)))


def test_a_stored_order_is_reused_only_for_the_same_rows_and_student(tmp_path):
    path = tmp_path / "difficulty.jsonl"
    keys = ["a#0", "b#0", "c#0"]
    assert _read_difficulty(path, keys, "toy:student") is None  # nothing stored yet
    write(path, ["c#0", "a#0", "b#0"])
    assert _read_difficulty(path, keys, "toy:student") == [2, 0, 1]  # indices of keys, easy -> hard
    assert _read_difficulty(path, keys, "other/student") is None  # measured with another student
    assert _read_difficulty(path, keys + ["d#0"], "toy:student") is None  # other rows
    assert _read_difficulty(path, ["a#0", "b#0", "x#0"], "toy:student") is None
    path.write_text("not json\n")
    assert _read_difficulty(path, keys, "toy:student") is None  # unreadable: measure again
