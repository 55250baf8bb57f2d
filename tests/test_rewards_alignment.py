"""Base and alignment rewards (DESIGN §2 steps 2-4), against numbers worked out by hand."""

import math
import random

import pytest
import torch

from tars.errors import UserError
from tars.rewards import (
    accuracy_reward,
    alignment_rewards,
    base_reward,
    behavior_reward,
    choose_references,
    cosine_similarity,
    embedding_text,
    representation_reward,
    select_layers,
    text_alignment_reward,
)
from tars.rewards.alignment import PAPER_EMBEDDER, SentenceEmbedder, resolve_embedder

R2 = 1 / math.sqrt(2)  # 0.70710678...

# ---- base reward -----------------------------------------------------------------------------------
COMPLETIONS = [
    "<think>4 is 2+2</think><answer>The answer is B.</answer>",  # right, strict format
    "<answer>A</answer>",  # wrong, loose format (no think, a letter)
    "I have no idea",  # unreadable, no format
    "<think>two and two</think> <answer>The answer is (B)</answer>",  # right, strict
    "<think>hmm</think>The answer is B, I think, <answer>B</answer> done",  # right, loose (extra text)
]
OPTIONS = [["3", "4"]] * 5
ANSWERS = ["B", "B", "B", "b", "B"]


def test_accuracy_reward_reads_the_gold_letter():
    # extract_choice: B, A, None, B, B; gold B (the 4th given as "b") -> 1, 0, 0, 1, 1
    assert accuracy_reward(COMPLETIONS, OPTIONS, ANSWERS) == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_a_gold_letter_with_spaces_still_counts():
    assert accuracy_reward([COMPLETIONS[0]] * 2, OPTIONS[:2], [" b ", "B\n"]) == [1.0, 1.0]


def test_base_reward_adds_weighted_format():
    # By default the paper's binary R_fmt (as the trainer): loose formats earn nothing.
    # λ=0.5: 1+0.5·1=1.5, 0+0=0, 0+0=0, 1+0.5=1.5, 1+0=1
    assert base_reward(COMPLETIONS, OPTIONS, ANSWERS) == [1.5, 0.0, 0.0, 1.5, 1.0]
    # graded format_score (the reference code's scale): 1, 0.5, 0, 1, 0.5
    # λ=0.5: 1.5, 0+0.5·0.5=0.25, 0, 1.5, 1+0.5·0.5=1.25
    assert base_reward(COMPLETIONS, OPTIONS, ANSWERS, format_levels="graded") == [1.5, 0.25, 0.0, 1.5, 1.25]
    # graded × λ=1 (the reference code's weight): 2, 0.5, 0, 2, 1.5
    assert base_reward(COMPLETIONS, OPTIONS, ANSWERS, format_weight=1.0, format_levels="graded") == [
        2.0, 0.5, 0.0, 2.0, 1.5]


def test_base_reward_rejects_unpaired_lists():
    with pytest.raises(ValueError, match="one options list and one answer per completion"):
        base_reward(COMPLETIONS, OPTIONS[:2], ANSWERS)


# ---- layers ----------------------------------------------------------------------------------------
def test_select_layers_named_ranges():
    assert select_layers("all", 4) == [1, 2, 3, 4]
    # 30 = 10 + 10 + 10
    assert select_layers("shallow", 30) == list(range(1, 11))
    assert select_layers("middle", 30) == list(range(11, 21))
    assert select_layers("deep", 30) == list(range(21, 31))
    # 4 = 2 + 1 + 1 (earlier thirds take the remainder; shallow = 1..ceil(4/3) = 1..2)
    assert [select_layers(t, 4) for t in ("shallow", "middle", "deep")] == [[1, 2], [3], [4]]
    # 5 = 2 + 2 + 1
    assert [select_layers(t, 5) for t in ("shallow", "middle", "deep")] == [[1, 2], [3, 4], [5]]
    # last-4 of 30: 30-4+1 = 27 .. 30
    assert select_layers("last-4", 30) == [27, 28, 29, 30]
    assert select_layers(" LAST-1 ", 30) == [30]


def test_select_layers_explicit():
    assert select_layers([8, 1, 16], 16) == [1, 8, 16]
    assert select_layers("3, 1", 4) == [1, 3]  # as a key=value override spells it


def test_paper_layer_groups_are_1_10_11_20_21_30_cut_to_the_model():
    groups = ("shallow", "middle", "deep")
    # Qwen2-7B, 28 layers: the paper's 21-30 stops at 28; equal thirds of 28 = 10 + 9 + 9
    assert [select_layers(g, 28, "paper") for g in groups] == [list(range(1, 11)), list(range(11, 21)),
                                                               list(range(21, 29))]
    assert [select_layers(g, 28, "equal_thirds") for g in groups] == [list(range(1, 11)), list(range(11, 20)),
                                                                      list(range(20, 29))]
    # Phi-4-mini, 32 layers: 21-30 as written (31, 32 in no group); equal thirds 11 + 11 + 10
    assert select_layers("deep", 32, "paper") == list(range(21, 31))
    assert select_layers("deep", 32, "equal_thirds") == list(range(23, 33))
    assert select_layers("deep", 30, "paper") == select_layers("deep", 30, "equal_thirds")  # 30: the same
    # a 4-layer model has no paper middle/deep group: say how to split it instead
    with pytest.raises(ValueError, match="no deep group of the paper's.*layer_groups=equal_thirds"):
        select_layers("deep", 4, "paper")
    assert select_layers("shallow", 4, "paper") == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="layer_groups must be one of"):
        select_layers("deep", 30, "halves")


def test_select_layers_ranges():
    assert select_layers("21-28", 28) == list(range(21, 29))
    assert select_layers("1-3, 7", 8) == [1, 2, 3, 7]
    assert select_layers("5", 8) == [5]
    with pytest.raises(ValueError, match="runs backwards"):
        select_layers("5-3", 8)
    with pytest.raises(ValueError, match="listed twice"):
        select_layers("1-3,2", 8)
    with pytest.raises(ValueError, match=r"each must be an int in 1\.\.28"):
        select_layers("21-30", 28)


@pytest.mark.parametrize(
    "spec, n, message",
    [
        ("deep", 2, "no deep third"),  # 2 = 1 + 1 + 0
        ("last-0", 8, "k must be in 1..8"),
        ("last-9", 8, "k must be in 1..8"),
        ([0, 1], 8, "each must be an int in 1..8"),
        ([9], 8, "each must be an int in 1..8"),
        ([True], 8, "each must be an int"),
        ([2, 2], 8, "listed twice"),
        ([], 8, "at least one layer"),
        ("bottom", 8, "expected one of all, shallow"),
        (3, 8, "expected one of"),
    ],
)
def test_select_layers_rejects(spec, n, message):
    with pytest.raises(ValueError, match=message):
        select_layers(spec, n)


# ---- cosines ---------------------------------------------------------------------------------------
def test_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-2.0, -4.0], [1.0, 1.0]])
    # [1,0]·[0,1] = 0; [1,1]·[1,0] / (√2·1) = 1/√2; [1,2] vs -2·[1,2] = -1; zero vector -> 0, not NaN
    assert cosine_similarity(a, b).tolist() == pytest.approx([0.0, R2, -1.0, 0.0])


def test_cosine_keeps_float64_clamps_and_refuses_mismatched_shapes():
    # float64 in, float64 out (the bf16 policy's states go to float32, a float64 caller keeps its precision)
    a64 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    assert cosine_similarity(a64, a64.float()).dtype == torch.float64
    assert cosine_similarity(a64.half(), a64.half()).dtype == torch.float32
    # a vector with itself is exactly 1, never 1 + rounding (a reward above its bound)
    x = torch.tensor([[0.1, 0.7, 0.3]] * 8, dtype=torch.float32) * torch.arange(1, 9)[:, None]
    assert cosine_similarity(x, x).max().item() <= 1.0
    with pytest.raises(ValueError, match="mismatched shapes"):
        cosine_similarity(torch.zeros(2, 3), torch.zeros(2, 4))


def test_representation_reward_refuses_what_is_not_rollouts_by_layers_by_hidden():
    with pytest.raises(ValueError, match=r"\[rollouts, layers, hidden\]"):
        representation_reward(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no layer"):
        representation_reward(torch.zeros(2, 0, 3), torch.zeros(2, 0, 3))


def test_representation_reward_is_mean_of_layer_cosines():
    speech = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]])  # [S=2, L=2, H=2]
    text = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[3.0, 0.0], [5.0, 5.0]]])
    # rollout 0: layer cosines 0 and 1/√2 -> (0 + 0.70710678) / 2 = 0.35355339
    # rollout 1: layer cosines 1 ([2,0] ∥ [3,0]) and 0 (zero vector) -> 0.5
    assert representation_reward(speech, text).tolist() == pytest.approx([R2 / 2, 0.5])
    # not the cosine of the concatenated states: for rollout 1 that would be 6 / (2·√59) = 0.39
    assert representation_reward(speech, text)[1].item() != pytest.approx(6 / (2 * math.sqrt(59)))


def test_behavior_reward_by_hand():
    # [3,4]·[4,3] / (5·5) = 24/25 = 0.96
    assert behavior_reward(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])).tolist() == pytest.approx([0.96])


# ---- references ------------------------------------------------------------------------------------
def test_round_robin_cycles_through_correct_text_rollouts():
    correct = [False, True, False, True]  # correct ones: 1, 3
    assert choose_references(correct, 4, "round_robin") == [1, 3, 1, 3]
    assert choose_references(correct, 3, "round_robin") == [1, 3, 1]
    assert choose_references([False] * 4, 3, "round_robin") == [None, None, None]


def test_random_references_are_correct_uniform_and_seeded():
    correct = [False, True, False, True]
    picks = choose_references(correct, 2000, "random", random.Random(0))
    assert set(picks) == {1, 3}
    assert 900 < picks.count(1) < 1100  # uniform: 1000 expected, sd ≈ 22
    assert choose_references(correct, 8, "random", random.Random(5)) == choose_references(
        correct, 8, "random", random.Random(5)
    )
    assert choose_references([False, False], 2, "random", random.Random(0)) == [None, None]
    with pytest.raises(ValueError, match="needs an rng"):
        choose_references(correct, 2, "random")
    with pytest.raises(ValueError, match="reference mode"):
        choose_references(correct, 2, "best")


# ---- one question's group --------------------------------------------------------------------------
SPEECH_POOLED = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # S=2, L=1, H=2
TEXT_POOLED = torch.tensor([[[9.0, 9.0]], [[0.0, 1.0]], [[1.0, 0.0]]])  # G=3
SPEECH_EMB = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
TEXT_EMB = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 1.0]])


def test_alignment_rewards_pairs_with_correct_text():
    out = alignment_rewards(
        [False, True, True], speech_pooled=SPEECH_POOLED, text_pooled=TEXT_POOLED,
        speech_emb=SPEECH_EMB, text_emb=TEXT_EMB, mode="round_robin",
    )
    # text rollout 0 is wrong (and would give rep 1/√2, beh 1 for speech 0): references are 1, 2
    assert out.references == [1, 2]
    # rep: s0 [1,0] vs t1 [0,1] = 0; s1 [1,1] vs t2 [1,0] = 1/√2
    assert out.rep.tolist() == pytest.approx([0.0, R2])
    # beh: s0 [3,4] vs t1 [4,3] = 24/25; s1 [1,0] vs t2 [0,1] = 0
    assert out.beh.tolist() == pytest.approx([0.96, 0.0])
    assert out.no_reference is False


def test_alignment_rewards_zero_without_correct_text():
    out = alignment_rewards(
        [False, False, False], speech_pooled=SPEECH_POOLED, text_pooled=TEXT_POOLED,
        speech_emb=SPEECH_EMB, text_emb=TEXT_EMB, mode="random", rng=random.Random(0),
    )
    assert out.rep.tolist() == [0.0, 0.0] and out.beh.tolist() == [0.0, 0.0]
    assert out.references == [None, None] and out.no_reference is True


def test_alignment_rewards_one_kind_only():
    out = alignment_rewards([False, True, True], speech_emb=SPEECH_EMB, text_emb=TEXT_EMB, mode="round_robin")
    assert out.rep.tolist() == [0.0, 0.0]  # +beh ablation: no representation reward
    assert out.beh.tolist() == pytest.approx([0.96, 0.0])
    with pytest.raises(ValueError, match="both speech and text"):
        alignment_rewards([True], speech_emb=SPEECH_EMB)
    with pytest.raises(ValueError, match="2 text embeddings rows for 3 text rollouts"):
        alignment_rewards([True, True, True], speech_emb=SPEECH_EMB, text_emb=TEXT_EMB[:2])
    with pytest.raises(ValueError, match="nothing to align"):
        alignment_rewards([True])
    with pytest.raises(ValueError, match="differ beyond rows"):
        alignment_rewards([True, True, True], speech_emb=SPEECH_EMB, text_emb=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="disagree on the number of rollouts: \\[1, 2\\]"):
        alignment_rewards([False, True, True], speech_pooled=SPEECH_POOLED[:1], text_pooled=TEXT_POOLED,
                          speech_emb=SPEECH_EMB, text_emb=TEXT_EMB)


def test_text_alignment_reward_modes():
    speech = [0.5, 1.0, 0.0, 0.3]
    assert text_alignment_reward(speech, "speech_mean") == pytest.approx(0.45)  # 1.8 / 4
    assert text_alignment_reward(speech, "zero") == 0.0
    assert text_alignment_reward(speech, "none") is None
    assert text_alignment_reward([], "speech_mean") == 0.0
    with pytest.raises(ValueError, match="text alignment mode"):
        text_alignment_reward(speech, "text_mean")


# ---- sentence embeddings ---------------------------------------------------------------------------
def test_embedding_text_drops_tags_keeps_answer():
    text = "<think> I add 2 and 2.\n</think>\n<ANSWER>The answer is B.</answer >"
    assert embedding_text(text) == "I add 2 and 2. The answer is B."
    assert embedding_text("no tags  at\tall") == "no tags at all"
    # strip_tags=False (the paper's R_beh): the completion as generated, whitespace collapsed only
    assert embedding_text(text, strip_tags=False) == "<think> I add 2 and 2. </think> <ANSWER>The answer is B.</answer >"


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder()


def test_sentence_embedder_paraphrase_beats_unrelated(embedder):
    e = embedder.embed([
        "The cat sat on the mat.",
        "A cat was sitting on a rug.",
        "Interest rates rose sharply last quarter.",
    ])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    assert e.norm(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    para, unrelated = behavior_reward(e[:1], e[1:2]).item(), behavior_reward(e[:1], e[2:]).item()
    assert para > unrelated + 0.3
    assert embedder.embed([]).shape == (0, 384)
    # embed_completions embeds the tag-free text; with strip_tags=False the text as it is
    done = embedder.embed_completions(["<think>The cat sat on the mat.</think>"])
    assert torch.allclose(done, e[:1], atol=1e-5)
    raw = embedder.embed_completions(["<think>The cat sat on the mat.</think>"], strip_tags=False)
    assert torch.allclose(raw, embedder.embed(["<think>The cat sat on the mat.</think>"]), atol=1e-5)
    assert behavior_reward(raw, e[:1]).item() < 0.99  # the tags move the embedding


def test_sentence_embedder_bad_path(tmp_path):
    with pytest.raises(UserError, match="no sentence embedding model folder at") as err:
        SentenceEmbedder(tmp_path / "missing")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="cannot load a sentence embedding model") as err:
        SentenceEmbedder(tmp_path)  # an empty folder
    assert "\n" not in str(err.value)


# ---- which embedder --------------------------------------------------------------------------------
@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_resolve_embedder_packaged_folder_and_hub_cache(tmp_path, empty_hub_cache):
    from tars.rewards.alignment import _default_model_path

    assert resolve_embedder(None) == _default_model_path()
    assert resolve_embedder(tmp_path) == tmp_path
    # a hub id already in the Hugging Face cache resolves to its snapshot, without the network
    repo = empty_hub_cache / "models--Qwen--Qwen3-Embedding-0.6B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert resolve_embedder(PAPER_EMBEDDER) == repo / "snapshots" / "abc123"


def test_an_embedder_missing_offline_is_one_line_naming_the_key(tmp_path, empty_hub_cache):
    with pytest.raises(UserError) as err:
        resolve_embedder(PAPER_EMBEDDER)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config: embedder: Qwen/Qwen3-Embedding-0.6B cannot be loaded offline")
    assert "hf download Qwen/Qwen3-Embedding-0.6B" in msg and "embedder=null" in msg
    with pytest.raises(UserError, match="config: embedder: no sentence embedding model folder at .*embedder=null"):
        resolve_embedder(tmp_path / "nowhere" / "model")
