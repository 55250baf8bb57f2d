"""VoiceBench-style local copies: a parquet file and a save_to_disk folder, both built here."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import tone
from tars.data.jsonl import read_records
from tars.data.voicebench import import_voicebench, split_prompt
from tars.errors import UserError


def wav_bytes(seconds, sr=16000, channels=1):
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, sr, channels), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


ROWS = [
    {"prompt": "Which of these is a mammal? A. shark B. whale C. trout D. eel", "reference": "B",
     "audio": {"bytes": wav_bytes(1.0), "path": "q0.wav"}},
    {"prompt": "What melts ice fastest?\nA. salt\nB. sand\nC. stones\nD. shade", "reference": "A",
     "audio": {"bytes": wav_bytes(0.5, 44100, 2), "path": None}},
]


@pytest.mark.parametrize(
    "prompt, question, options",
    [
        ("Q? A. x B. y", "Q?", ["x", "y"]),
        ("Pick one:\nA) red\nB) blue\nC) green", "Pick one:", ["red", "blue", "green"]),
        ("Plan A. is bad. Which? A. one B. two C. three", "Plan A. is bad. Which?", ["one", "two", "three"]),
        ("Vitamin C. helps. (A) yes (B) no", "Vitamin C. helps.", ["yes", "no"]),
    ],
)
def test_split_prompt(prompt, question, options):
    assert split_prompt(prompt) == (question, options)


def test_split_prompt_without_options():
    with pytest.raises(ValueError, match="lettered options"):
        split_prompt("Tell me a story.")


def test_parquet_import(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "openbookqa.parquet")
    recs = import_voicebench(tmp_path / "openbookqa.parquet", tmp_path / "out")
    assert [r.id for r in recs] == ["openbookqa-00000", "openbookqa-00001"]
    assert recs[0].question == "Which of these is a mammal?" and recs[0].options[1] == "whale"
    assert recs[1].options == ["salt", "sand", "stones", "shade"] and recs[1].answer == "A"
    back = read_records(tmp_path / "out" / "manifest.jsonl", check_audio_files=True)
    assert [r.duration_s for r in back] == [1.0, 0.5]
    from tars.data.audio import load_audio
    assert len(load_audio(tmp_path / "out" / back[1].audio)) == 8000  # 44.1 kHz stereo converted


def test_save_to_disk_folder_with_paths_and_explicit_columns(tmp_path):
    """A `save_to_disk` folder holds Arrow IPC stream files; audio may be a path instead of bytes."""
    folder = tmp_path / "mmsu_law"
    folder.mkdir()
    sf.write(str(tmp_path / "a.wav"), tone(0.3), 16000)
    table = pa.Table.from_pylist([
        {"id": "law-1", "question": "Is it legal?", "choices": ["yes", "no", "maybe"], "answer": 2,
         "subject": "law", "audio": {"bytes": None, "path": str(tmp_path / "a.wav")}},
    ])
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    recs = import_voicebench(folder, tmp_path / "out", name="mmsu")
    assert recs[0].id == "law-1" and recs[0].answer == "C" and recs[0].subject == "law"
    assert recs[0].options == ["yes", "no", "maybe"] and recs[0].source == "VoiceBench mmsu"


def test_bad_rows_are_named(tmp_path):
    rows = [dict(ROWS[0], reference="E"), dict(ROWS[1], prompt="no options here"),
            dict(ROWS[0], audio={"bytes": b"not audio", "path": "x.wav"})]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(UserError) as e:
        import_voicebench(tmp_path / "bad.parquet", tmp_path / "out")
    lines = str(e.value).splitlines()
    assert lines[0].endswith("bad.parquet:row 0: answer: 'E' is outside the 4 options (A-D)")
    assert lines[1].endswith("bad.parquet:row 1: prompt: could not find lettered options (A. … B. …) in the prompt")
    assert lines[2].endswith("bad.parquet:row 2: audio: not a readable audio file")
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_missing_audio_column_and_bad_paths(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q? A. x B. y", "reference": "A"}]), tmp_path / "n.parquet")
    with pytest.raises(UserError, match="no `audio` column"):
        import_voicebench(tmp_path / "n.parquet", tmp_path / "o")
    with pytest.raises(UserError, match="not found"):
        import_voicebench(tmp_path / "nothing", tmp_path / "o")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(UserError, match="DatasetDict; pass one split folder, one of: test"):
        import_voicebench(tmp_path / "dd", tmp_path / "o")


def test_a_git_lfs_pointer_instead_of_parquet_is_named(tmp_path):
    # what a clone made without git-lfs holds in place of the data
    (tmp_path / "test.parquet").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n")
    with pytest.raises(UserError, match="test.parquet: not a readable parquet file .*Git LFS pointer"):
        import_voicebench(tmp_path / "test.parquet", tmp_path / "o")
