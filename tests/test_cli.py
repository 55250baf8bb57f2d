"""The `tars` command as a user meets it: help texts, one-line errors, exit codes, no tracebacks."""

import pytest

from conftest import good_row, run_cli, write_jsonl

COMMANDS = [[], ["data"], ["data", "validate"], ["data", "make"], ["data", "families"],
            ["data", "import-voicebench"], ["speak"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "tars")
def test_every_command_has_help(cmd):
    res = run_cli(*cmd, "--help")
    assert res.returncode == 0
    assert "Usage:" in res.stdout and len(res.stdout) > 200


def test_validate_ok_counts_records(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [good_row(i) for i in range(3)])
    res = run_cli("data", "validate", f)
    assert res.returncode == 0 and res.stdout.strip() == f"{f}: 3 valid records"


def test_validate_bundled_openbookqa():
    res = run_cli("data", "validate", "openbookqa")
    assert res.returncode == 0 and "500 valid records" in res.stdout


def test_validate_lists_every_problem_and_exits_2(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [good_row(0), "{oops", good_row(1, answer="F"), "[]", good_row(0)])
    res = run_cli("data", "validate", f)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(f"{f}:2: malformed JSON")
    assert lines[1] == f"{f}:3: answer: 'F' is outside the 4 options (A-D)"
    assert lines[2] == f"{f}:4: expected a JSON object, got list"
    assert lines[3] == f"{f}:5: id: duplicate id 'q0' (first on line 1)"
    assert lines[4] == f"{f}: 4 problem(s), 1 valid record(s)"
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage\n"], ids=["empty", "non-utf8"])
def test_validate_unreadable_files(tmp_path, content):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    res = run_cli("data", "validate", f)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(f) in res.stderr


def test_speak_on_a_bad_file_is_one_line_per_problem(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [good_row(0, options="x")])
    res = run_cli("speak", f, "--out", tmp_path / "o")
    assert res.returncode == 2
    assert res.stderr.strip() == f"tars: error: {f}:1: options: must be a list of strings, got str"


def test_speak_without_espeak_says_how_to_install(tmp_path):
    import os
    import sys
    f = write_jsonl(tmp_path / "d.jsonl", [good_row(0)])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    res = run_cli("speak", f, "--out", tmp_path / "o", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "espeak-ng not found on PATH" in res.stderr and "apt-get install espeak-ng" in res.stderr


def test_usage_errors_exit_2_without_traceback(tmp_path):
    res = run_cli("data", "make", "--family", "nope", "--n", "3", "--out", tmp_path / "x.jsonl")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nope" in res.stderr
    res = run_cli("speak")
    assert res.returncode == 2 and "Missing argument" in res.stderr


def test_make_then_validate(tmp_path):
    out = tmp_path / "a.jsonl"
    res = run_cli("data", "make", "--family", "arithmetic", "--n", "20", "--seed", "3", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "20 valid records" in run_cli("data", "validate", out).stdout


def test_make_excludes_questions_of_other_sets(tmp_path):
    import json
    train = tmp_path / "train.jsonl"
    assert run_cli("data", "make", "--family", "facts", "--n", "60", "--seed", "1", "--out", train).returncode == 0
    held = tmp_path / "held.jsonl"
    res = run_cli("data", "make", "--family", "facts", "--n", "30", "--seed", "2", "--exclude", train, "--out", held)
    assert res.returncode == 0, res.stderr
    seen = {json.loads(l)["question"] for l in train.read_text().splitlines()}
    got = [json.loads(l)["question"] for l in held.read_text().splitlines()]
    assert len(got) == 30 and not seen & set(got)


def test_make_excludes_a_named_set(tmp_path):
    """`--exclude mini:heldout` reads the named set, as every other data argument does."""
    import json

    from tars.data.mini_sets import mini_set_file
    held = tmp_path / "held.jsonl"
    res = run_cli("data", "make", "--family", "all", "--n", "40", "--exclude", "mini:heldout", "--out", held)
    assert res.returncode == 0, res.stderr
    seen = {json.loads(l)["question"] for l in mini_set_file("heldout").read_text().splitlines()}
    got = [json.loads(l)["question"] for l in held.read_text().splitlines()]
    assert len(got) == 40 and not seen & set(got)


def test_an_out_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    """An operating-system error about a file the user named (here: --out is an existing folder) is the
    user's to fix: one line with the path, exit 1, no traceback."""
    (tmp_path / "taken").mkdir()
    res = run_cli("data", "make", "--family", "facts", "--n", "3", "--out", tmp_path / "taken")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("tars: error: ") and str(tmp_path / "taken") in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_help_starts_with_the_demo():
    out = run_cli("--help").stdout
    assert "Start with `tars demo`" in " ".join(out.split())
    listed = [line.split()[1] for line in out.split("Commands")[1].splitlines() if line.startswith("│ ") and line[2] != " "]
    assert listed[0] == "demo" and {"speak", "train", "eval", "data", "mini"} <= set(listed)


def test_data_make_names_the_n_given():
    res = run_cli("data", "make", "--family", "all", "--n", "-3", "--out", "x.jsonl")
    assert res.returncode == 2 and res.stderr.strip().endswith("got -3") and "Traceback" not in res.stderr


def test_commands_print_no_library_progress_bars_or_deepspeed_warnings(tmp_path):
    from tiny_models import tiny_qwen2_audio

    model = tiny_qwen2_audio(tmp_path / "m")
    f = write_jsonl(tmp_path / "d.jsonl", [good_row(0)])
    res = run_cli("eval", "--model", model, "--data", f, "--modality", "text", "--out", tmp_path / "ev",
                  "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr
    for noise in ("Loading weights", "Writing model shards", "Setting accelerator", "[WARNING]"):
        assert noise not in res.stderr + res.stdout
