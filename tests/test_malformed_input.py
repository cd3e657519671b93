"""Malformed bytes in a file a user hands kdray are a KdrayError, never a traceback (issue 14).

For the job spec (YAML and JSON), each data format (JSONL, parquet, a save_to_disk directory)
and a model directory (tokenizer, config, weights): a byte that is not UTF-8, a lone surrogate,
a NUL, a file cut short. Each must be a SpecError / DataError / ModelError that names the file,
the line or row (and column / byte offset where known) and the fix; the CLI exits 2; nothing is
written. Text with a lone surrogate or a NUL in a field the job uses makes a bad row, which
``data.on_bad_rows`` fails on or skips. Expected positions are set by how each file is built.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kdray import cli
from kdray.data.datasets import load_split, read_rows
from kdray.errors import DataError, ModelError, SpecError
from kdray.spec import DataSpec, load_spec, parse_spec, parse_spec_text


def words(prompts):
    return [len(p.split()) for p in prompts]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def spec_dict(tmp_path: Path, **overrides) -> dict:
    spec = {"name": "t", "output_dir": str(tmp_path / "out"), "teacher": {"model": "toy:teacher"},
            "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout"}}
    spec.update(overrides)
    return spec


def validate(path: Path, capsys) -> tuple[int, str]:
    """``kdray validate PATH`` in this process: (exit status, stderr)."""
    rc = cli.main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, " ".join(err.split())  # rich wraps long lines


# -- the job spec --------------------------------------------------------------------------------

def test_a_spec_with_a_byte_that_is_not_utf8_in_a_comment_exits_2_naming_line_column_and_offset(tmp_path, capsys):
    body = yaml.safe_dump(spec_dict(tmp_path)).encode()
    path = tmp_path / "bad.yaml"
    path.write_bytes(body + b"# caf\xe9 au lait\n")  # the byte after "# caf" on the line after the body
    before = listing(tmp_path)
    rc, err = validate(path, capsys)
    assert rc == 2
    line = body.count(b"\n") + 1
    assert f"{path} is not UTF-8 text: line {line}, column 6 (byte offset {len(body) + 5}): byte 0xE9" in err
    assert "save the file as UTF-8" in err
    assert listing(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_utf16_spec_and_one_cut_inside_a_character_say_so(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes("name: t\n".encode("utf-16"))
    with pytest.raises(SpecError, match=r"line 1, column 1 \(byte offset 0\): byte 0x(FF|FE) is not UTF-8 "
                                        r"\(the file is UTF-16\); save the file as UTF-8"):
        load_spec(path)
    path.write_bytes("name: t\n# caf\u00e9".encode()[:-1])  # the last character's second byte is gone
    with pytest.raises(SpecError, match=r"line 2, column 6 .*it may be cut short"):
        load_spec(path)


@pytest.mark.parametrize("suffix, escape", [(".yaml", '"runs/x\\ud800"'), (".json", '"runs/x\\ud800"'),
                                            (".yaml", '"runs/x\\0"'), (".json", '"runs/x\\u0000"')])
def test_a_lone_surrogate_or_nul_escape_in_a_spec_is_an_error_of_its_field(tmp_path, capsys, suffix, escape):
    spec = spec_dict(tmp_path)
    del spec["output_dir"]
    text = json.dumps(spec)[:-1] + f', "output_dir": {escape}}}'  # JSON is YAML too
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    before = listing(tmp_path)
    rc, err = validate(path, capsys)
    assert rc == 2
    what = ("a lone surrogate U+D800 (half of a UTF-16 pair: invalid unicode)" if "d800" in escape
            else "a NUL character (U+0000)")
    assert f"invalid job spec in {path}: 1 error(s) output_dir: the text 'runs/x" in err
    assert f"holds {what} at character 7; remove it, or write the character itself" in err
    assert listing(tmp_path) == before


def test_a_surrogate_pair_escape_is_one_character_and_the_service_body_is_checked_too(tmp_path):
    emoji = chr(0x1F600)  # U+1F600 is the pair D83D DE00 in UTF-16
    body = spec_dict(tmp_path)
    del body["data"]
    spec = parse_spec_text(yaml.safe_dump(body) + 'data: {train: toy:train, heldout: toy:heldout, '
                           'prompt_field: "q\\ud83d\\ude00"}\n')
    assert spec.data.prompt_field == "q" + emoji
    with pytest.raises(SpecError) as info:  # a JSON body the service decoded with json.loads
        parse_spec(json.loads(json.dumps(spec_dict(tmp_path)).replace('"t"', '"t\\udfff"', 1)))
    assert info.value.errors[0][0] == "name" and "a lone surrogate U+DFFF" in info.value.errors[0][1]
    assert len(info.value.errors) == 1  # the pattern error of the same field is not repeated
    body = spec_dict(tmp_path, teacher={"model": "toy:teacher", "x\x00": 1})
    body["data"]["max_prompt_tokens"] = "many"
    with pytest.raises(SpecError) as info:  # a bad key, and another field's error reported with it
        parse_spec(body)
    assert [path for path, _ in info.value.errors] == ["teacher.x\\u0000", "data.max_prompt_tokens"]
    assert info.value.errors[0][1].startswith("the key 'x\\u0000' holds a NUL character (U+0000) at character 2")


def test_a_nul_byte_in_a_yaml_file_names_its_line_and_column(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: t\n# a\x00b\n")
    rc, err = validate(path, capsys)
    assert rc == 2
    assert "line 2, column 4: not valid YAML: the character U+0000 is not allowed in a YAML file; remove it" in err


def test_a_spec_cut_short_or_empty_exits_2_with_the_line(tmp_path, capsys):
    text = json.dumps(spec_dict(tmp_path), indent=1)
    path = tmp_path / "spec.json"
    path.write_text(text[: text.index('"student"')])  # cut after the teacher: an unclosed mapping
    rc, err = validate(path, capsys)
    assert rc == 2 and f"invalid job spec in {path}" in err and "not valid YAML" in err
    assert f"line {text[: text.index('student')].count(chr(10)) + 1}," in err
    path.write_bytes(b"")
    rc, err = validate(path, capsys)
    assert rc == 2 and "the spec is empty" in err
    assert not (tmp_path / "out").exists()


# -- data ----------------------------------------------------------------------------------------

def test_a_jsonl_byte_that_is_not_utf8_or_a_file_cut_short_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "1", "prompt": "p"}\n{"id": "2", "prompt": "caf\xe9"}\n')
    before = listing(tmp_path)
    with pytest.raises(DataError) as info:
        load_split(DataSpec(train=str(path), heldout=str(path)), "train", words, need_response=False)
    assert str(info.value).startswith(f"data.train: {path}: line 2 is not UTF-8 text (byte 27 of the line, 0xE9)")
    assert str(info.value).endswith("save the file as UTF-8")
    line = '{"id": "3", "prompt": "na\u00efve"}'.encode()
    path.write_bytes(b'{"id": "1", "prompt": "p"}\n' + line[: line.index(b"\xaf")])  # cut inside the \xc3\xaf
    with pytest.raises(DataError, match=r"line 2 is not UTF-8 text .*the file may be cut short\); save the file as"):
        read_rows(str(path))
    path.write_bytes(b'{"id": "1", "prompt": "p"}\n{"id": "2", "pro')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON \(.*no newline: the file may be cut short\); fix"):
        read_rows(str(path))
    path.write_bytes(b'{"id": "1", "prompt": "a\x00b"}\n')  # a raw NUL: JSON does not allow it in a string
    with pytest.raises(DataError, match=r"line 1 is not valid JSON \(Invalid control character at column 25\)"):
        read_rows(str(path))
    assert listing(tmp_path) == before


ROWS = [{"id": "a", "prompt": "fine", "response": "r"},
        {"id": "b", "prompt": "lone \ud800 half", "response": "r"},
        {"id": "c", "prompt": "ok", "response": "nul \x00 inside"},
        {"id": "d\udc80", "prompt": "ok", "response": "r"},
        {"id": "e", "prompt": "pair \U0001F600 is fine", "response": "r"}]


def test_jsonl_rows_with_a_lone_surrogate_or_nul_are_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # json.dumps writes \ud800 and \u0000 escapes
    with pytest.raises(DataError) as info:
        load_split(DataSpec(train=str(path), heldout=str(path)), "train", words, need_response=True)
    msg = str(info.value)
    assert msg.startswith("data.train: 3 of 5 rows are bad: ")
    assert "1 rows with invalid unicode in field 'prompt' (first ids: b)" in msg
    assert "1 rows with invalid unicode in field 'response' (first ids: c)" in msg
    assert "1 rows with invalid unicode in field 'id' (first ids: #3)" in msg  # the row number, not the id
    assert "(row b: field 'prompt' holds a lone surrogate U+D800 (half of a UTF-16 pair: invalid unicode) " \
           "at character 6" in msg
    assert f"Fix the dataset '{path}'" in msg and "data.on_bad_rows: skip" in msg
    rows, report = load_split(DataSpec(train=str(path), heldout=str(path), on_bad_rows="skip"), "train", words,
                              need_response=True)
    assert [r["id"] for r in rows] == ["a", "e"] and rows[1]["prompt"] == "pair \U0001F600 is fine"
    assert report.as_dict()["total"] == 5 and report.kept == 2 and report.n_bad == 3


def _text_column(values: list[bytes]) -> pa.Array:
    """A string column holding these bytes as they are (Arrow does not check UTF-8 on read)."""
    raw = pa.array(values, type=pa.binary())
    return pa.Array.from_buffers(pa.string(), len(values), raw.buffers())


def _bad_table() -> pa.Table:
    return pa.table({"id": ["1", "2", "3", "4"],
                     "prompt": _text_column([b"fine", b"caf\xe9", b"ok", b"nul \x00"]),
                     "response": ["r", "r", "r", "r"],
                     "notes": _text_column([b"x", b"y", b"\xff unused", b"z"])})


def _save_to_disk(table: pa.Table, root: Path) -> Path:
    root.mkdir()
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return root


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_parquet_and_saved_cells_that_are_not_utf8_are_bad_rows_and_unused_columns_do_not_matter(tmp_path, fmt):
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(_bad_table(), path)
    else:
        path = _save_to_disk(_bad_table(), tmp_path / "saved")
    before = listing(tmp_path)
    spec = DataSpec(train=str(path), heldout=str(path))
    with pytest.raises(DataError) as info:
        load_split(spec, "train", words, need_response=True)
    msg = str(info.value)
    assert msg.startswith("data.train: 2 of 4 rows are bad: 2 rows with invalid unicode in field 'prompt' "
                          "(first ids: 2, 4)")
    assert "(row 2: field 'prompt' holds the byte 0xE9, which is not UTF-8" in msg and f"'{path}'" in msg
    rows, report = load_split(DataSpec(train=str(path), heldout=str(path), on_bad_rows="skip"), "train", words,
                              need_response=True)
    assert [r["id"] for r in rows] == ["1", "3"] and report.n_bad == 2  # row 3's bad 'notes' is not used
    assert listing(tmp_path) == before


def test_a_parquet_or_saved_dataset_cut_short_names_the_file(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(_bad_table(), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=rf"{path} is not a readable parquet file \(.*\); it may be cut short"):
        read_rows(str(path))
    saved = _save_to_disk(_bad_table(), tmp_path / "saved")
    data = saved / "data-00000-of-00001.arrow"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"cannot read {data}, a data file of the saved dataset {saved} .*"
                                        "save the dataset again with save_to_disk"):
        read_rows(str(saved))
    state = saved / "state.json"
    raw = b'{"_data_files": [{"filename": "d\xe9.arrow"}]}'
    state.write_bytes(raw)
    at = raw.index(b"\xe9")  # one line of ASCII before it: column = offset + 1
    with pytest.raises(DataError, match=rf"{state} is not UTF-8 text \(line 1, column {at + 1} \(byte offset {at}\): "
                                        r"byte 0xE9 is not UTF-8\); save the dataset again"):
        read_rows(str(saved))
    state.write_text('{"_data_files": [{"filena')
    with pytest.raises(DataError, match=rf"{state} is not a datasets state file \(JSONDecodeError"):
        read_rows(str(saved))


def test_a_hub_dataset_cell_that_is_not_utf8_is_a_bad_row(tmp_path, monkeypatch):
    pytest.importorskip("datasets")  # the optional extra kdray[hub]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # load_dataset("org/name") reads the local directory org/name
    (tmp_path / "org" / "name" / "data").mkdir(parents=True)
    pq.write_table(_bad_table(), tmp_path / "org" / "name" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DataError) as info:
        load_split(DataSpec(train="hub:org/name:train", heldout="hub:org/name:train"), "train", words,
                   need_response=True)
    assert "2 rows with invalid unicode in field 'prompt' (first ids: 2, 4)" in str(info.value)
    assert "Fix the dataset 'hub:org/name:train'" in str(info.value)
    rows = read_rows("hub:org/name:train[1:3]")
    assert [r["id"] for r in rows] == ["2", "3"] and rows[0]["prompt"] == "caf" + chr(0xDC00 + 0xE9)


# -- a model directory ---------------------------------------------------------------------------

@pytest.fixture
def model_copy(tmp_path, toy_world):
    from kdray.models import resolve_model

    def copy(name: str) -> Path:
        return Path(shutil.copytree(resolve_model("toy:student"), tmp_path / name))

    return copy


def _start_of_line_3(raw: bytes) -> int:
    return raw.index(b"\n", raw.index(b"\n") + 1) + 1


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"])
def test_a_model_file_with_a_bad_byte_or_cut_short_is_a_model_error_naming_it(model_copy, name):
    from kdray.models import check_model_files, load_causal_lm, load_tokenizer

    bad = model_copy("bad")
    raw = (bad / name).read_bytes()
    at = _start_of_line_3(raw)
    (bad / name).write_bytes(raw[:at] + b"\xff" + raw[at:])
    where = f"{bad / name} is not UTF-8 text: line 3, column 1 (byte offset {at}): byte 0xFF is not UTF-8"
    fix = "copy or download the model again, or write it again with save_pretrained"
    with pytest.raises(ModelError, match="model directory") as info:
        check_model_files(str(bad))
    assert where in str(info.value) and str(info.value).endswith(fix)
    loads = {"tokenizer.json": [load_tokenizer], "tokenizer_config.json": [load_tokenizer],
             "config.json": [load_tokenizer, lambda ref: load_causal_lm(ref, "float32")], "generation_config.json": []}
    for load in loads[name]:
        with pytest.raises(ModelError, match=f"cannot load the (tokenizer|weights) of model '{bad}' on node") as info:
            load(str(bad))
        assert where in str(info.value) and fix in str(info.value)
    cut = model_copy("cut")
    text = (cut / name).read_text()
    (cut / name).write_text(text[: len(text) // 2])
    with pytest.raises(ModelError, match=rf"{cut / name} is not valid JSON: .* \(the file ends there: it is cut "
                                         r"short\); copy or download the model again"):
        check_model_files(str(cut))
    for load in loads[name]:
        with pytest.raises(ModelError, match=rf"{cut / name} is not valid JSON"):
            load(str(cut))


def test_weights_cut_short_or_missing_from_their_index_are_a_model_error_naming_the_file(model_copy, tmp_path, capsys):
    from kdray.models import check_model_files, load_causal_lm, load_output_head

    cut = model_copy("cut")
    weights = cut / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])
    says = f"{weights} is cut short: {size - 10} bytes, its header needs {size} (10 missing)"
    for check in (check_model_files, lambda ref: load_causal_lm(ref, "float32"),
                  lambda ref: load_output_head(ref, "float32")):
        with pytest.raises(ModelError) as info:
            check(str(cut))
        assert says in str(info.value) and "copy or download the model again" in str(info.value)
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(ModelError, match=rf"{weights} is cut short: 5 bytes, fewer than the 8"):
        check_model_files(str(cut))

    sharded = model_copy("sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match=r"lists model-00002-of-00002.safetensors, which is missing"):
        check_model_files(str(sharded))

    spec = tmp_path / "spec.yaml"  # kdray validate: the student's field, exit 2, nothing written
    spec.write_text(yaml.safe_dump(spec_dict(tmp_path, student={"model": str(cut)})))
    before = listing(tmp_path)
    rc, err = validate(spec, capsys)
    assert rc == 2 and f"student.model: model directory '{cut}': {weights} is cut short" in err
    assert listing(tmp_path) == before


def test_a_torch_bin_cut_short_is_a_model_error_naming_it(model_copy):
    import torch
    from safetensors.torch import load_file

    from kdray.models import check_model_files, load_causal_lm

    binary = model_copy("binary")
    torch.save(load_file(str(binary / "model.safetensors")), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    raw = (binary / "pytorch_model.bin").read_bytes()
    (binary / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError, match=rf"{binary / 'pytorch_model.bin'} is cut short or corrupt \(not a whole zip"):
        check_model_files(str(binary))
    with pytest.raises(ModelError, match=r"cannot load the weights of model .*pytorch_model.bin is cut short"):
        load_causal_lm(str(binary), "float32")


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path):
    spec = tmp_path / "twice.yaml"
    spec.write_text("name: demo\noutput_dir: runs/x\ndata:\n  train: toy:train\n  heldout: toy:heldout\n"
                    "teacher: {model: toy:teacher}\nstudent: {model: toy:student}\ndata:\n  train: toy:train\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert "line 8" in str(info.value) and "'data' is written twice" in str(info.value)
    assert "first on line 3" in str(info.value)
    merged = tmp_path / "merged.yaml"  # a merge key may still be overridden
    merged.write_text("base: &b {model: toy:teacher, dtype: float32}\nname: demo\noutput_dir: runs/x\n"
                      "data: {train: toy:train, heldout: toy:heldout}\nteacher: {<<: *b, dtype: bfloat16}\n"
                      "student: {model: toy:student}\n")
    with pytest.raises(SpecError, match="base"):  # an unknown top-level field, not a duplicate
        load_spec(merged)


def test_a_config_that_is_not_an_object_or_has_a_field_of_the_wrong_type_is_a_model_error(model_copy, tmp_path):
    from kdray.models import check_model_files, load_tokenizer, vocab_size

    listed = model_copy("listed")
    (listed / "config.json").write_text("[]")
    with pytest.raises(ModelError, match=rf"{listed / 'config.json'} holds a JSON list, not an object of fields"):
        check_model_files(str(listed))
    with pytest.raises(ModelError, match="holds a JSON list"):
        load_tokenizer(str(listed))
    typed = model_copy("typed")
    config = json.loads((typed / "config.json").read_text())
    (typed / "config.json").write_text(json.dumps({**config, "vocab_size": str(config["vocab_size"])}))
    with pytest.raises(ModelError, match=r"vocab_size.*the files in .*typed are not a model the library can read") as info:
        vocab_size(str(typed))
    assert "HF_TOKEN" not in str(info.value)  # a local directory: no download advice
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"), "teacher": {"model": "toy:teacher"},
                                    "student": {"model": str(listed)},
                                    "data": {"train": "toy:train", "heldout": "toy:heldout"}}))
    assert cli.main(["validate", str(spec)]) == 2
