"""`tars analyze rewards` (eval/reward_signal.py): the statistics by hand, and a run on a tiny model."""

import json

import pytest
import torch

from conftest import good_row, needs_espeak, run_cli, write_jsonl
from tars.eval.reward_signal import centred_correlation, layer_sets, markdown, run_reward_signal, summarize
from tiny_models import tiny_qwen2_audio


def test_centred_correlation_by_hand():
    # row 1: x − mean = [−1, 0, 1], y − mean = [−2/3, 1/3, 1/3] → Σxy = 1, |x| = √2, |y| = √(2/3) → √3/2.
    # row 2: x constant, so it says nothing about direction and is left out.
    x = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    y = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert centred_correlation(x, y) == pytest.approx(3 ** 0.5 / 2)
    # a per-row offset changes nothing (it cancels in the advantage too), a sign flip flips it
    assert centred_correlation(x + torch.tensor([[10.0], [-4.0]]), y) == pytest.approx(3 ** 0.5 / 2)
    assert centred_correlation(-x, y) == pytest.approx(-(3 ** 0.5) / 2)
    assert centred_correlation(x[1:], y[1:]) is None  # no row where both vary
    with pytest.raises(ValueError, match="same"):
        centred_correlation(x, y[:, :2])


def test_summarize_by_hand_counts_only_groups_with_a_reference():
    rep = {"mean / all": [0.9, 0.9], "last / last": [0.5, 0.7]}
    groups = [
        {"acc": [1.0, 0.0], "fmt": [1.0, 1.0], "beh": [0.8, 0.4], "reference": [0, 0], "rep": rep},
        {"acc": [0.0, 1.0], "fmt": [1.0, 0.0], "beh": [0.6, 0.6], "reference": [1, 1],
         "rep": {"mean / all": [0.95, 0.97], "last / last": [0.2, 0.2]}},
        {"acc": [1.0, 1.0], "fmt": [1.0, 1.0], "beh": [0.0, 0.0], "reference": None, "rep": {}},  # no reference
    ]
    s = summarize(groups)
    assert list(s) == ["R_acc", "R_fmt", "R_beh", "R_rep mean / all", "R_rep last / last"]
    assert s["R_acc"]["mean"] == pytest.approx(0.5) and s["R_acc"]["spread"] == pytest.approx(0.5)
    assert s["R_acc"]["corr_acc"] is None
    # R_beh: group 1 std 0.2 (0.8 / 0.4), group 2 std 0; centred (+0.2, −0.2) against acc (+0.5, −0.5) → +1
    assert s["R_beh"]["spread"] == pytest.approx(0.1) and s["R_beh"]["corr_acc"] == pytest.approx(1.0)
    # R_rep mean/all: group 1 constant, group 2 (0.95, 0.97) against acc (0, 1) → +1; spread (0 + 0.01) / 2
    assert s["R_rep mean / all"]["spread"] == pytest.approx(0.005)
    assert s["R_rep mean / all"]["corr_acc"] == pytest.approx(1.0)
    # R_rep last/last: group 1 (0.5, 0.7) against acc (1, 0) → −1; group 2 constant (0.2, 0.2): mean 0.4,
    # spread (0.1 + 0) / 2
    assert s["R_rep last / last"]["corr_acc"] == pytest.approx(-1.0)
    assert s["R_fmt"]["mean"] == pytest.approx(0.75)
    md = markdown(s, 3, 2, "m")
    assert "3 questions, 2 with a correct text reference" in md and "| R_rep last / last | 0.4000 | 0.0500 | -1.00 |" in md
    assert summarize(groups[2:]) == {}


def test_layer_sets_are_all_the_thirds_and_the_last():
    assert layer_sets(30) == {"all": list(range(1, 31)), "shallow": list(range(1, 11)),
                              "middle": list(range(11, 21)), "deep": list(range(21, 31)), "last": [30]}


def test_layer_sets_cut_the_thirds_as_the_trainer_s_layer_groups():
    # 28 layers (Qwen2): the paper's fixed 1-10 / 11-20 / 21-28 by default, equal thirds when asked
    paper, thirds = layer_sets(28), layer_sets(28, "equal_thirds")
    assert paper["middle"] == list(range(11, 21)) and paper["deep"] == list(range(21, 29))
    assert thirds["middle"] == list(range(11, 20)) and thirds["deep"] == list(range(20, 29))
    # a group the model lacks is left out rather than failing the analysis
    assert list(layer_sets(4)) == ["all", "shallow", "last"] and layer_sets(4)["shallow"] == [1, 2, 3, 4]


@needs_espeak
def test_analyze_rewards_on_a_tiny_model_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    from lively import make_lively

    import tars.rewards.accuracy as accuracy

    make_lively(monkeypatch.setattr)  # rollouts that stop, an accuracy that varies
    monkeypatch.setattr(accuracy, "accuracy_reward", lambda texts, o, a: [float(sum(t.encode()) % 2) for t in texts])
    from tars.rewards.alignment import SentenceEmbedder

    strip_args = []
    embed = SentenceEmbedder.embed_completions
    monkeypatch.setattr(SentenceEmbedder, "embed_completions",
                        lambda self, c, strip_tags=True: strip_args.append(strip_tags) or embed(self, c, strip_tags))
    model = tiny_qwen2_audio(tmp_path / "m", window_s=20.0)
    data = tmp_path / "q.jsonl"
    write_jsonl(data, [good_row(i, question=f"What is {i} plus 2?") for i in range(3)])
    out = tmp_path / "out"
    res = run_reward_signal(str(model), str(data), out, questions=2, rollouts=3, max_new_tokens=8, progress=False)
    groups = [json.loads(l) for l in (out / "groups.jsonl").read_text().splitlines()]
    assert [g["id"] for g in groups] == ["q0", "q1"] and all(len(g["acc"]) == 3 for g in groups)
    assert res["questions"] == 2 and res["with_reference"] == sum(g["reference"] is not None for g in groups)
    assert res["with_reference"] > 0  # the lively accuracy gives some question a correct text rollout
    # the paper's layer groups on a 4-layer model: shallow is 1-4, middle (11-20) and deep (21-30) don't exist
    assert set(res["rewards"]) == {"R_acc", "R_fmt", "R_beh"} | {f"R_rep {p} / {k}" for p in ("mean", "last")
                                                                 for k in ("all", "shallow", "last")}
    assert all(-1.0 <= v <= 1.0 for g in groups if g["rep"] for r in g["rep"].values() for v in r)
    assert strip_args and not any(strip_args)  # R_beh on the text as generated, as the trainer's default
    # a kill cut the last line in half; one more question asked: the whole line is read back, the cut
    # question and the new one are sampled
    text = (out / "groups.jsonl").read_text()
    (out / "groups.jsonl").write_text(text[: len(text) - 40])
    res3 = run_reward_signal(str(model), str(data), out, questions=3, rollouts=3, max_new_tokens=8, progress=False)
    again = [json.loads(l) for l in (out / "groups.jsonl").read_text().splitlines()]
    assert again[0] == groups[0] and [g["id"] for g in again] == ["q0", "q1", "q2"] and res3["questions"] == 3
    assert json.loads((out / "reward_signal.json").read_text())["questions"] == 3
    from tars.errors import UserError

    with pytest.raises(UserError, match="rollouts=3 \\(now 4\\)"):
        run_reward_signal(str(model), str(data), out, questions=3, rollouts=4, max_new_tokens=8, progress=False)
    # a folder from before the reward settings were recorded was made with stripped tags: not resumed
    settings = json.loads((out / "settings.json").read_text())
    assert settings["beh_strip_tags"] is False and settings["layer_groups"] == "paper"
    del settings["beh_strip_tags"], settings["layer_groups"], settings["embedder"]
    (out / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match="beh_strip_tags=True \\(now False\\)"):
        run_reward_signal(str(model), str(data), out, questions=3, rollouts=3, max_new_tokens=8, progress=False)


def test_analyze_rewards_bad_arguments_are_one_line_errors(tmp_path):
    r = run_cli("analyze", "rewards", "--model", tmp_path / "none", "--data", "mini:rl_train", "--out", tmp_path / "o",
                "--rollouts", "1")
    assert r.returncode != 0 and "--rollouts" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("analyze", "rewards", "--model", tmp_path / "none", "--data", "mini:rl_train", "--out", tmp_path / "o",
                "--layer-groups", "thirds")
    assert r.returncode != 0 and "--layer-groups thirds" in r.stderr and "Traceback" not in r.stderr
