import pytest

from tars.data.prompts import ANSWER_TEMPLATE
from tars.rewards import format_score

T = "<think>Eating out every day costs a lot.</think>"
A = "<answer>The answer is B.</answer>"

CASES = [
    # --- 1.0: the exact format ----------------------------------------------------------------
    ("strict", T + A, 1.0),
    ("strict-whitespace-between-and-around", "\n  " + T + "\n\n" + A + "\n", 1.0),
    ("strict-parenthesised-letter", T + "<answer>The answer is (C).</answer>", 1.0),
    ("strict-no-period", T + "<answer>The answer is D</answer>", 1.0),
    ("strict-padded-answer", T + "<answer> The answer is A. </answer>", 1.0),
    ("strict-multiline-think", "<think>Step 1.\nStep 2.\n</think><answer>The answer is J.</answer>", 1.0),
    # --- 0.5: recognisable but loose -----------------------------------------------------------
    ("empty-think", "<think>  </think>" + A, 0.5),
    ("lowercase-wording", T + "<answer>the answer is B.</answer>", 0.5),
    ("lowercase-letter", T + "<answer>The answer is b.</answer>", 0.5),
    ("letter-beyond-j", T + "<answer>The answer is K.</answer>", 0.5),
    ("two-letters", T + "<answer>The answer is AB.</answer>", 0.5),
    ("bare-letter-with-think", T + "<answer>B</answer>", 0.5),
    ("option-text-answer", T + "<answer>The answer is quit eating lunch out</answer>", 0.5),
    ("text-before", "Sure! " + T + A, 0.5),
    ("text-after", T + A + " Hope this helps.", 0.5),
    ("text-between", T + " So: " + A, 0.5),
    ("nested-think", "<think>a<think>b</think></think>" + A, 0.5),
    ("answer-tag-in-think", "<think>I will write <answer>x</answer></think>" + A, 0.5),
    ("duplicated-answer", T + A + "<answer>The answer is C.</answer>", 0.5),
    ("empty-then-filled-answer", T + "<answer></answer>" + A, 0.5),
    ("answer-only-canonical", A, 0.5),
    ("answer-only-bare-letter", "<answer>(B)</answer>", 0.5),
    ("answer-only-lowercase-words", "Here you go: <answer>the answer is C</answer>", 0.5),
    # --- 0.0: not the format ---------------------------------------------------------------------
    ("empty", "", 0.0),
    ("no-tags", "The answer is B.", 0.0),
    ("think-only", T, 0.0),
    ("answer-unclosed", T + "<answer>The answer is B.", 0.0),
    ("think-unclosed", "<think>Eating out costs a lot." + A, 0.0),
    ("think-close-only", "Eating out costs a lot.</think>" + A, 0.0),
    ("answer-before-think", A + T, 0.0),
    ("empty-answer", T + "<answer>  </answer>", 0.0),
    ("answer-only-text", "<answer>quit eating lunch out</answer>", 0.0),
    ("answer-only-two-letters", "<answer>A and C</answer>", 0.0),
    ("answer-only-letter-beyond-j", "<answer>The answer is K.</answer>", 0.0),
    ("uppercase-tags", "<THINK>x</THINK><ANSWER>The answer is B.</ANSWER>", 0.0),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_format_score(text, expected):
    assert format_score(text) == expected


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


def test_the_prompt_template_scores_full_marks():
    assert format_score(ANSWER_TEMPLATE.format(reasoning="Because.", letter="C")) == 1.0
    assert format_score(ANSWER_TEMPLATE.format(reasoning="", letter="C")) == 0.5


@pytest.mark.parametrize(("text", "graded"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_binary_levels_pay_the_strict_format_only(text, graded):
    # the paper's R_fmt: 1 exactly where the graded scale gives 1, the loose 0.5s become 0
    assert format_score(text, "binary") == (1.0 if graded == 1.0 else 0.0)


def test_levels_change_only_the_loose_cases():
    loose = "Sure! " + T + A
    assert (format_score(loose, "graded"), format_score(loose, "binary")) == (0.5, 0.0)
    assert format_score(T + A, "binary") == format_score(T + A, "graded") == 1.0
    with pytest.raises(ValueError, match="format levels"):
        format_score(T + A, "ternary")
