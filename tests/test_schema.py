"""Schema validation and the JSONL reader: every bad input named by file:line and field."""

import json

import pytest

from conftest import good_row, write_jsonl, write_wav
from tars.data.jsonl import load_records, read_records, write_records
from tars.data.schema import parse_record
from tars.errors import UserError


def problems_of(tmp_path, rows, **kw):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    return load_records(f, **kw)


def test_good_file_roundtrips(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [good_row(0), good_row(1, extra_key=[1, 2])])
    recs = read_records(f)
    assert [r.id for r in recs] == ["q0", "q1"]
    assert recs[0].answer_text == "4"
    assert recs[1].extra == {"extra_key": [1, 2]}
    out = tmp_path / "o.jsonl"
    write_records(out, recs)
    assert [json.loads(x) for x in out.read_text().splitlines()] == [good_row(0), good_row(1, extra_key=[1, 2])]


@pytest.mark.parametrize(
    "row, field, words",
    [
        ('{"id": "x", "question": ', "", "malformed JSON"),
        ("[1, 2, 3]", "", "expected a JSON object"),
        ({k: v for k, v in good_row().items() if k != "question"}, "question", "missing"),
        ({k: v for k, v in good_row().items() if k != "answer"}, "answer", "missing"),
        (good_row(options="A or B"), "options", "must be a list"),
        (good_row(options=["only one"]), "options", "2 to 10"),
        (good_row(options=[str(i) for i in range(11)]), "options", "2 to 10"),
        (good_row(options=["1", 2, "3"]), "options[1]", "must be a string"),
        (good_row(options=["1", " ", "3"]), "options[1]", "is empty"),
        (good_row(answer="b"), "answer", "capital letter"),
        (good_row(answer=1), "answer", "capital letter"),
        (good_row(answer="AB"), "answer", "capital letter"),
        (good_row(answer="E"), "answer", "outside the 4 options"),
        (good_row(question="   "), "question", "is empty"),
        (good_row(question=7), "question", "must be a string"),
        (good_row(id=""), "id", "non-empty"),
        (good_row(subject=3), "subject", "string or null"),
        (good_row(duration_s=-1), "duration_s", "positive"),
        (good_row(duration_s="long"), "duration_s", "positive"),
    ],
)
def test_each_bad_record_is_named(tmp_path, row, field, words):
    recs, probs = problems_of(tmp_path, [good_row(9), row])
    assert [r.id for r in recs] == ["q9"]
    assert len(probs) == 1
    p = probs[0]
    assert p.where == f"{tmp_path / 'd.jsonl'}:2"
    assert p.field == field
    assert words in p.message
    assert str(p).startswith(f"{tmp_path / 'd.jsonl'}:2: ")


def test_all_problems_of_a_record_are_listed(tmp_path):
    _, probs = problems_of(tmp_path, [{"id": "x", "options": "no", "answer": "z"}])
    assert {p.field for p in probs} == {"question", "options", "answer"}


def test_duplicate_ids(tmp_path):
    recs, probs = problems_of(tmp_path, [good_row(1), good_row(2), good_row(1)])
    assert len(recs) == 2
    assert probs[0].where.endswith(":3") and "duplicate id 'q1' (first on line 1)" in probs[0].message


def test_empty_file(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text("\n  \n")
    recs, probs = load_records(f)
    assert recs == [] and "file is empty" in probs[0].message


def test_non_utf8_file_names_the_line(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(json.dumps(good_row(0)).encode() + b"\n" + '{"id": "caf\xe9"}'.encode("latin-1") + b"\n")
    _, probs = load_records(f)
    assert len(probs) == 1 and probs[0].where.endswith("latin.jsonl:2") and "UTF-8" in probs[0].message


def test_missing_file_and_directory(tmp_path):
    assert "file not found" in load_records(tmp_path / "nope.jsonl")[1][0].message
    assert "directory" in load_records(tmp_path)[1][0].message


def test_read_records_raises_one_line_per_problem(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [good_row(0, answer="Z"), "not json"])
    with pytest.raises(UserError) as e:
        read_records(f)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[0].endswith("must be one capital letter A-J, got 'Z'")


def test_audio_checks(tmp_path):
    write_wav(tmp_path / "ok.wav", 1.0)
    write_wav(tmp_path / "stereo44.wav", 1.0, sr=44100, channels=2)
    write_wav(tmp_path / "long.wav", 3.0)
    (tmp_path / "text.wav").write_text("this is not audio")
    import soundfile as sf
    import numpy as np
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    rows = [good_row(0, audio="ok.wav"), good_row(1, audio="stereo44.wav"), good_row(2, audio="missing.wav"),
            good_row(3, audio="text.wav"), good_row(4, audio="empty.wav"), good_row(5, audio="long.wav")]
    recs, probs = problems_of(tmp_path, rows, check_audio_files=True, max_audio_s=2.0)
    assert [r.id for r in recs] == ["q0", "q1"]
    msgs = {p.where.rsplit(":", 1)[1]: p.message for p in probs}
    assert all(p.field == "audio" for p in probs)
    assert "not found" in msgs["3"]
    assert "not a readable audio file" in msgs["4"]
    assert "empty" in msgs["5"]
    assert "3.0 s long, over the 2 s limit" in msgs["6"]
    # Without the audio check the same file is structurally valid.
    assert len(problems_of(tmp_path, rows)[0]) == 6


def test_shared_data_files_validate():
    from conftest import SHARED
    if not SHARED.exists():
        pytest.skip("shared data not present")
    recs = read_records(SHARED / "openbookqa_test.jsonl")
    assert len(recs) == 500 and recs[0].subject is None


def test_parse_record_strips_and_keeps_optional():
    rec, probs = parse_record(good_row(question="  Why?  ", voice="v", cot="c", difficulty=2), "w")
    assert not probs and rec.question == "Why?" and rec.voice == "v" and rec.difficulty == 2
