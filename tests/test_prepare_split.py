"""The training split through Ray Data (kdray.data.split): read and checked by tasks, written as
the committed ``datasets/prompts/``, with the report and errors of the driver path (load_split)
word for word, duplicates caught across read units and files, and the dataset reused on resume."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kdray.data.artifacts import MARKER, Artifact
from kdray.data.datasets import load_split
from kdray.data.split import write_checked_split
from kdray.data.tokenize import PromptEncoding, prompt_token_counter
from kdray.errors import DataError
from kdray.spec import DataSpec

ROWS = [
    {"id": "a", "prompt": "add 1 2", "response": "3"},
    {"id": "b", "question": "no prompt field", "response": "x"},
    {"id": "c", "prompt": "   ", "response": "y"},
    {"id": "d", "prompt": "one two three " * 20, "response": "z"},
    {"id": "a", "prompt": "duplicate id, in another read unit", "response": "w"},
    {"id": "e", "prompt": "sort 3 1", "response": "1 3"},
    {"prompt": "no id", "response": "v"},
    {"id": "f", "prompt": "half a pair \ud800 here", "response": "u"},
    {"id": "g", "prompt": "a number as response", "response": 3},
    {"id": 7, "prompt": "an int id", "response": "t"},
    {"id": "7", "prompt": "the same id as text", "response": "s"},
    {"id": "e", "prompt": "the last duplicate", "response": "r"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_saved(path, tables):
    """A save_to_disk directory of one arrow file per table."""
    path.mkdir()
    names = []
    for i, table in enumerate(tables):
        names.append(f"data-{i:05d}-of-{len(tables):05d}.arrow")
        with pa.OSFile(str(path / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    return path


@pytest.fixture(scope="module")
def student(toy_world):
    from kdray import toy

    return str(toy.resolve("toy:student"))


@pytest.fixture(scope="module")
def count(student):
    from kdray.models import load_tokenizer

    return prompt_token_counter(load_tokenizer(student), PromptEncoding())


def through_ray(spec, path, student, chunk=None, need_response=True):
    """The split through Ray Data, JSONL cut every ``chunk`` bytes (default: 3 lines of ROWS, so
    each duplicate but one is in another read task than its first row)."""
    chunk = chunk or len("".join(json.dumps(r) + "\n" for r in ROWS[:3]).encode())
    return write_checked_split(spec, "train", path, need_response=need_response, tokenizer_ref=student,
                               encoding=PromptEncoding(), jsonl_chunk_bytes=chunk)


def rows_of(artifact: Artifact) -> list[dict]:
    return [r for batch in artifact.read().iter_batches(batch_format="pyarrow") for r in batch.to_pylist()]


def cases(tmp_path):
    """Each source the reader cuts into several units, with duplicates across units/files."""
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    table = pa.table({"id": ["1", "2", "3", "2", "4"], "prompt": ["p1", "p2", "p3", "again 2", "p4"],
                      "response": ["r1", "r2", "r3", "r4", "r5"]})
    saved = write_saved(tmp_path / "saved", [table.slice(0, 2), table.slice(2)])  # "2" in both files
    parquet = tmp_path / "rows.parquet"
    pq.write_table(table, parquet, row_group_size=2)  # "2" in row groups 0 and 1
    return {"jsonl": jsonl, "saved": saved, "parquet": parquet}


def test_units_read_every_row_once_in_file_order_whatever_the_cut(tmp_path, monkeypatch):
    from kdray.data import sources

    rows = [{"id": str(i), "prompt": "p" * (i % 7)} for i in range(23)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    for chunk in (1, 17, 64, 10**6):
        parts = [part for unit in sources.source_units(str(data), chunk) for part in sources.count_unit(unit)]
        assert [r for unit, _, _ in parts for r in sources.unit_rows(unit)] == rows
        assert sum(n for _, n, _ in parts) == 23
    monkeypatch.setattr(sources, "CHUNK_ROWS", 4)
    table = pa.table({"id": [str(i) for i in range(10)], "prompt": ["p"] * 10})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=3)
    saved = write_saved(tmp_path / "saved", [pa.Table.from_batches(table.to_batches(max_chunksize=2)), table])
    for ref, cuts in ((tmp_path / "rows.parquet", [6, 4]), (saved, [4, 4, 2, 10])):
        parts = [part for unit in sources.source_units(str(ref)) for part in sources.count_unit(unit)]
        assert [n for _, n, _ in parts] == cuts and [f for _, _, f in parts][0] == ["id", "prompt"]
        assert [r for unit, _, _ in parts for r in sources.unit_rows(unit)] == sources.read_rows(str(ref))


@pytest.mark.parametrize("source", ["jsonl", "saved", "parquet"])
def test_fail_and_skip_match_the_driver_path_word_for_word_across_read_units(tmp_path, ray_cpus, student, count,
                                                                            source):
    data = cases(tmp_path)[source]
    out = tmp_path / "out" / "prompts"
    fail = DataSpec(train=str(data), heldout=str(data), max_prompt_tokens=24)
    with pytest.raises(DataError) as expected:
        load_split(fail, "train", count, need_response=True)
    with pytest.raises(DataError) as got:
        through_ray(fail, out, student)
    assert str(got.value) == str(expected.value)
    assert "duplicate id (first ids: " in str(got.value)
    assert not out.exists() and not list(out.parent.glob(".prompts.partial-*"))  # nothing half-written

    skip = fail.model_copy(update={"on_bad_rows": "skip"})
    kept, report = load_split(skip, "train", count, need_response=True)
    done = through_ray(skip, out, student)
    assert done.meta["report"] == report.as_dict() and done.rows == report.kept
    assert [{k: r[k] for k in ("id", "prompt", "response")} for r in rows_of(done)] == kept  # file order
    assert (out / MARKER).is_file()


def test_duplicates_keep_the_first_row_in_file_order_and_ids_are_text(tmp_path, ray_cpus, student):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    spec = DataSpec(train=str(data), heldout=str(data), max_prompt_tokens=24, on_bad_rows="skip")
    chunk = len("".join(json.dumps(r) + "\n" for r in ROWS[:3]).encode())
    starts = [len("".join(json.dumps(r) + "\n" for r in ROWS[:i]).encode()) for i in range(len(ROWS))]
    unit = [start // chunk for start in starts]  # the read task of each row
    assert unit[0] != unit[4] and unit[5] != unit[11]  # a and e: their copies are read by other tasks
    done = through_ray(spec, tmp_path / "prompts", student, chunk=chunk)
    rows = rows_of(done)
    assert [(r["_row"], r["id"]) for r in rows] == [(0, "a"), (5, "e"), (9, "7")]  # 10's "7" and 11's "e" dropped
    assert done.meta["report"]["bad"]["rows with a duplicate id"] == {"count": 3, "first_ids": ["a", "7", "e"]}


def test_an_unreadable_line_in_a_later_unit_names_its_line_and_nothing_is_written(tmp_path, ray_cpus, student, count):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]) + "{not json\n" + json.dumps(ROWS[0]) + "\n")
    spec = DataSpec(train=str(data), heldout=str(data), max_train_samples=2)  # the cut does not hide it
    with pytest.raises(DataError) as expected:
        load_split(spec, "train", count, need_response=True)
    with pytest.raises(DataError) as got:
        through_ray(spec, tmp_path / "prompts", student, chunk=150)
    assert str(got.value) == str(expected.value)
    assert str(got.value).startswith(f"data.train: {data}: line 7 is not valid JSON")
    assert not (tmp_path / "prompts").exists()


def test_max_train_samples_takes_the_first_rows_in_file_order_and_ids_may_be_row_numbers(tmp_path, ray_cpus,
                                                                                         student):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"q": f"prompt {i}"} for i in range(40)])
    spec = DataSpec(train=str(data), heldout=str(data), prompt_field="q", id_field=None, max_train_samples=25)
    done = through_ray(spec, tmp_path / "prompts", student, chunk=200, need_response=False)
    assert [(r["_row"], r["id"], r["prompt"]) for r in rows_of(done)] == [(i, str(i), f"prompt {i}")
                                                                            for i in range(25)]
    assert done.info["columns"] == ["_row", "id", "prompt"]  # no response when none is needed
    assert done.meta["report"] == {"split": "train", "total": 25, "kept": 25, "bad": {}}


def test_a_misnamed_field_names_the_fields_the_rows_have(tmp_path, ray_cpus, student, count):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"id": str(i), "question": "q", "answer": "a"} for i in range(6)])
    spec = DataSpec(train=str(data), heldout=str(data), on_bad_rows="skip")
    with pytest.raises(DataError) as expected:
        load_split(spec, "train", count, need_response=True)
    with pytest.raises(DataError) as got:
        through_ray(spec, tmp_path / "prompts", student)
    assert str(got.value) == str(expected.value)
    assert "none of its 6 rows is usable" in str(got.value) and "(the rows have the fields answer, id, question)" in str(
        got.value)


# -- the prepare stage -------------------------------------------------------------------------

def test_prepare_writes_both_splits_from_ray_tasks_and_a_resumed_job_reuses_them(tmp_path, ray_cpus, toy_world,
                                                                                   monkeypatch):
    from kdray.data import sources
    from kdray.pipeline.progress import Reporter
    from kdray.spec import parse_spec
    from kdray.stages.context import StageContext
    from kdray.stages.prepare import Prepared, prepare

    data = write_jsonl(tmp_path / "train.jsonl", [{"id": str(i), "prompt": f"Q: sort {i} 1\nA:"} for i in range(30)]
                       + [{"id": "3", "prompt": "Q: a duplicate\nA:"}])
    spec = parse_spec(yaml.safe_load(yaml.safe_dump({
        "name": "split", "output_dir": str(tmp_path / "out"), "teacher": {"model": "toy:teacher"},
        "student": {"model": "toy:student"},
        "data": {"train": str(data), "heldout": "toy:heldout", "max_heldout_samples": 4, "on_bad_rows": "skip"}})))

    def not_here(unit):  # the driver reads no row of either split
        raise AssertionError(f"the driver read a row of {unit.source}")

    monkeypatch.setattr(sources, "unit_rows", not_here)
    messages: list[str] = []
    reporter = Reporter(None)
    monkeypatch.setattr(reporter, "message", messages.append)
    ctx = StageContext(spec, tmp_path / "out", reporter)
    prepared = prepare(ctx)
    assert [f.type for f in dataclasses.fields(Prepared) if f.name == "train"] == ["Artifact"]
    assert isinstance(prepared.train, Artifact) and prepared.train.path == tmp_path / "out" / "datasets" / "prompts"
    assert prepared.train.rows == 30 and prepared.row_reports["train"]["bad"] == {
        "rows with a duplicate id": {"count": 1, "first_ids": ["3"]}}
    assert prepared.train.column("id").tolist() == [str(i) for i in range(30)]
    assert prepared.heldout.path == tmp_path / "out" / "datasets" / "heldout"  # in tasks, as the training rows
    assert prepared.heldout.rows == 4 and prepared.row_reports["heldout"]["kept"] == 4
    assert prepared.heldout.column("_row").tolist() == [0, 1, 2, 3]
    assert {"id", "prompt", "response"} <= set(prepared.heldout.info["columns"])  # evaluation needs the gold
    marker = (prepared.train.path / MARKER).stat().st_mtime_ns

    data.unlink()  # a resumed job does not read the split again
    again = prepare(StageContext(spec, tmp_path / "out", reporter))
    assert again.train.info == prepared.train.info and again.row_reports == prepared.row_reports
    assert (again.train.path / MARKER).stat().st_mtime_ns == marker
    assert any("reusing the 30 training rows" in m for m in messages)
    assert any("reusing the 4 held-out rows" in m for m in messages) and again.heldout.info == prepared.heldout.info

    # Rows checked under other settings are not reused: the held-out ones are checked again, and
    # training rows (from which the job made what it resumes) are refused with the fix.
    data.write_text("")  # there for the spec's check, empty: the training rows are never read again
    fewer = parse_spec(yaml.safe_load(yaml.safe_dump({**spec.model_dump(mode="json"), "data": {
        **spec.data.model_dump(mode="json"), "max_heldout_samples": 3}})))
    messages.clear()
    with pytest.raises(DataError) as refused:
        prepare(StageContext(parse_spec(yaml.safe_load(yaml.safe_dump({**fewer.model_dump(mode="json"), "data": {
            **fewer.data.model_dump(mode="json"), "max_train_samples": 10}}))), tmp_path / "out", reporter))
    assert "changed data.max_train_samples since: run the job with --restart" in str(refused.value)
    fresh = prepare(StageContext(fewer, tmp_path / "out", reporter))
    assert fresh.heldout.rows == 3 and fresh.train.info == prepared.train.info
    assert any("changed data.max_heldout_samples: checking the held-out rows again" in m for m in messages)
