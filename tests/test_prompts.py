from tars.data.prompts import SYSTEM_PROMPT, gold_completion, lettered_options, spoken_text, text_prompt
from tars.data.schema import Record
from tars.rewards import extract_choice, format_score


def rec(**kw):
    base = dict(id="x", question="Which is a fruit", options=["chair", "apple", "road"], answer="B")
    base.update(kw)
    return Record(**base)


def test_letters_follow_the_options():
    assert lettered_options(["a", "b", "c", "d", "e"]) == "A. a\nB. b\nC. c\nD. d\nE. e"


def test_text_prompt_has_question_and_lettered_options():
    assert text_prompt(rec()) == "Which is a fruit\n\nA. chair\nB. apple\nC. road"


def test_spoken_text_reads_like_voicebench():
    assert spoken_text(rec()) == "Which is a fruit. A, chair. B, apple. C, road."
    assert spoken_text(rec(question="Why?", options=["Yes!", "no"])) == "Why? A, Yes! B, no."


def test_gold_completion_is_in_the_format_the_rewards_score():
    r = rec(cot="An apple is a fruit.")
    out = gold_completion(r)
    assert out == "<think>An apple is a fruit.</think><answer>The answer is B.</answer>"
    assert format_score(out) == 1.0 and extract_choice(out, r.options) == "B"
    assert "<think>" in SYSTEM_PROMPT and "<answer>" in SYSTEM_PROMPT
