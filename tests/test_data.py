"""Dataset reading and bad-row handling: counted, reported, never dropped silently."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdray.data.datasets import load_split, read_rows
from kdray.errors import DataError
from kdray.spec import DataSpec


def words(prompts):
    return [len(p.split()) for p in prompts]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def rows():
    return [
        {"id": "a", "prompt": "add 1 2", "response": "3"},
        {"id": "b", "question": "no prompt field", "response": "x"},
        {"id": "c", "prompt": "   ", "response": "y"},
        {"id": "d", "prompt": "one two three four five six", "response": "z"},
        {"id": "a", "prompt": "duplicate id", "response": "w"},
        {"id": "e", "prompt": "sort 3 1", "response": "1 3"},
    ]


def spec_for(path, **kw):
    return DataSpec(train=str(path), heldout=str(path), max_prompt_tokens=5, **kw)


def test_fail_is_the_default_and_names_the_ids_and_the_fix(tmp_path, rows):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_split(spec_for(path), "train", words, need_response=True)
    msg = str(info.value)
    assert "4 of 6 rows are bad" in msg
    assert "rows without prompt field 'prompt' (first ids: b)" in msg
    assert "empty or non-text prompt (first ids: c)" in msg
    assert "max_prompt_tokens=5 (first ids: d)" in msg
    assert "duplicate id (first ids: a)" in msg
    assert "data.on_bad_rows: skip" in msg


def test_skip_keeps_good_rows_and_counts_the_rest(tmp_path, rows):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kept, report = load_split(spec_for(path, on_bad_rows="skip"), "train", words, need_response=True)
    assert [r["id"] for r in kept] == ["a", "e"]
    assert report.total == 6 and report.kept == 2 and report.n_bad == 4
    assert report.as_dict()["bad"]["rows with a duplicate id"]["count"] == 1


def test_missing_response_is_bad_only_when_needed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "1", "prompt": "p"}])
    kept, _ = load_split(spec_for(path), "train", words, need_response=False)
    assert kept == [{"id": "1", "prompt": "p", "response": None}]
    with pytest.raises(DataError, match="without response field 'response'"):
        load_split(spec_for(path), "train", words, need_response=True)
    typed = write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "prompt": "p", "response": 3}])
    with pytest.raises(DataError, match=r"rows whose response field 'response' is not text \(first ids: 1\)"):
        load_split(spec_for(typed), "train", words, need_response=True)


def test_a_null_cell_of_a_parquet_column_is_told_apart_from_a_missing_field(tmp_path):
    """Every row of a parquet file has every column: an empty cell is a null, not a misnamed
    field, so the fix named is the data's, and the rows' fields are not listed."""
    table = pa.table({"id": ["1", "2", "3"], "prompt": ["p1", None, "p3"], "response": ["r1", "r2", None]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError) as info:
        load_split(spec_for(tmp_path / "d.parquet"), "train", words, need_response=True)
    msg = str(info.value)
    assert "rows whose prompt field 'prompt' is null (first ids: 2)" in msg
    assert "rows whose response field 'response' is null (first ids: 3)" in msg
    assert "without" not in msg and "point data.prompt_field" not in msg and "the rows have the fields" not in msg


def test_an_empty_needed_response_and_an_unusable_id_are_bad_rows(tmp_path):
    """An empty gold response would score an empty answer as an exact match; a null (or NaN) id
    would be the text "None" (two of them a "duplicate"), an empty or a mapping id no id at all.
    A number is an id (a float one: a pandas column of ids with a gap)."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "p", "response": ""}, {"id": "b", "prompt": "p", "response": " \n"},
        {"id": None, "prompt": "p", "response": "r"}, {"id": None, "prompt": "p", "response": "r"},
        {"id": "", "prompt": "p", "response": "r"}, {"id": {"x": 1}, "prompt": "p", "response": "r"},
        {"id": True, "prompt": "p", "response": "r"}, {"id": 17, "prompt": "p", "response": "r"},
        {"id": 3.0, "prompt": "p", "response": "r"}, {"id": float("nan"), "prompt": "p", "response": "r"}])
    with pytest.raises(DataError) as info:
        load_split(spec_for(path), "heldout", words, need_response=True)
    msg = str(info.value)
    assert "8 of 10 rows are bad" in msg and "rows with an empty response field 'response' (first ids: a, b)" in msg
    assert "rows whose id field 'id' is null, empty or not a string or a number (first ids: #2, #3, #4" in msg
    assert "duplicate" not in msg
    kept, _ = load_split(spec_for(path, on_bad_rows="skip"), "train", words, need_response=False)
    assert [r["id"] for r in kept] == ["a", "b", "17", "3.0"]  # no response needed: an empty one is no matter


def test_custom_fields_and_row_numbers_as_ids(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "hi", "a": "yo"}, {"q": "x y", "a": "z"}])
    spec = DataSpec(train=str(path), heldout=str(path), prompt_field="q", response_field="a", id_field=None)
    kept, _ = load_split(spec, "heldout", words, need_response=True)
    assert kept == [{"id": "0", "prompt": "hi", "response": "yo"}, {"id": "1", "prompt": "x y", "response": "z"}]


def test_max_samples_cuts_before_checking(tmp_path, rows):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kept, report = load_split(spec_for(path, max_train_samples=1), "train", words, need_response=True)
    assert [r["id"] for r in kept] == ["a"] and report.total == 1


def test_invalid_json_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_rows(str(path))


def test_parquet_and_save_to_disk_directories(tmp_path):
    table = pa.table({"id": ["1", "2"], "prompt": ["p1", "p2"], "response": ["r1", "r2"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert read_rows(str(tmp_path / "d.parquet"))[1] == {"id": "2", "prompt": "p2", "response": "r2"}

    ds_dir = tmp_path / "saved"
    ds_dir.mkdir()
    with pa.OSFile(str(ds_dir / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (ds_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert [r["prompt"] for r in read_rows(str(ds_dir))] == ["p1", "p2"]


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="no state.json"):
        read_rows(str(tmp_path))


def test_a_suffix_in_capitals_reads_as_its_format(tmp_path):
    """``TRAIN.JSONL`` and ``HELDOUT.PARQUET`` are taken by the spec and read as JSON lines and
    parquet (a parquet file read as JSON lines would fail on its first byte)."""
    from kdray.spec import parse_spec

    from specs import minimal

    lines = write_jsonl(tmp_path / "TRAIN.JSONL", [{"id": "a", "prompt": "p", "response": "r"}])
    pq.write_table(pa.table({"id": ["b"], "prompt": ["q"], "response": ["s"]}), tmp_path / "HELDOUT.PARQUET")
    spec = parse_spec(minimal(data={"train": str(lines), "heldout": str(tmp_path / "HELDOUT.PARQUET")}))
    assert load_split(spec.data, "train", words, need_response=True)[0] == [{"id": "a", "prompt": "p", "response": "r"}]
    assert load_split(spec.data, "heldout", words, need_response=True)[0] == [{"id": "b", "prompt": "q", "response": "s"}]


def test_a_job_evaluated_on_its_training_prompts_says_so(tmp_path):
    from kdray.data.datasets import heldout_note

    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "p", "response": "r"}])
    same = DataSpec(train=str(path), heldout=str(path))
    assert heldout_note(same, True) == (f"data.heldout is data.train ({path}), so the held-out scores are of "
                                        "prompts the student trained on, not of unseen ones")
    assert heldout_note(same, False) is None  # not evaluated: nothing to say
    assert heldout_note(DataSpec(train="toy:train", heldout="toy:heldout"), True) is None

