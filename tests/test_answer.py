import pytest

from tars.rewards import answer_span, extract_choice, normalize

# OpenBookQA-like: "A person wants to save money, so they could ..."
OBQA = [
    "make more phone calls",
    "quit eating lunch out",
    "buy less with monopoly money",
    "have lunch with friends",
]
NUM = ["12", "15", "18", "21"]
TEN = [f"option {i}" for i in range(10)]  # A-J all valid, so "I" is a letter in range
TWO = ["yes", "no"]
NESTED = ["lunch", "have lunch with friends", "dinner", "breakfast"]

THINK = "<think>Saving money means spending less. Eating out costs money every day.</think>"

CASES = [
    # --- the canonical format and its wrappings -----------------------------------------------
    ("canonical", THINK + "<answer>The answer is B.</answer>", OBQA, "B"),
    ("canonical-no-period", THINK + "<answer>The answer is B</answer>", OBQA, "B"),
    ("canonical-padded", THINK + "\n<answer> The answer is D. </answer>\n", OBQA, "D"),
    ("parenthesised", "<answer>(B)</answer>", OBQA, "B"),
    ("bold", "<answer>**C**</answer>", OBQA, "C"),
    ("bare-letter-span", "<answer>A</answer>", OBQA, "A"),
    ("bare-lowercase-span", "<answer>c</answer>", OBQA, "C"),
    ("lowercase-span-with-period", "<answer>d.</answer>", OBQA, "D"),
    ("option-word-span", "<answer>Option B</answer>", OBQA, "B"),
    ("answer-cue-lowercase", "Answer: b", OBQA, "B"),
    ("answer-is-lowercase", "After checking, the answer is c.", OBQA, "C"),
    ("paren-cue", "The answer is (C)", OBQA, "C"),
    ("answer-option-cue", "answer: option C", OBQA, "C"),
    ("correct-option-cue", "The correct option is D.", OBQA, "D"),
    ("correct-answer-choice", "The correct answer is choice (A).", OBQA, "A"),
    ("bold-answer-label", "**Answer:** C", OBQA, "C"),
    ("final-answer-heading", "Let me recap.\n\n**Final Answer**\n\nD", OBQA, "D"),
    ("final-answer-colon", "Final answer: A", OBQA, "A"),
    ("shouted-cue", "THE ANSWER IS C", OBQA, "C"),
    ("cue-with-colon", "The answer is: B", OBQA, "B"),
    ("cue-clearly", "So the answer is clearly option B.", OBQA, "B"),
    ("letter-paren-start", "<answer>B) quit eating lunch out</answer>", OBQA, "B"),
    ("letter-period-start", "<answer>B. quit eating lunch out</answer>", OBQA, "B"),
    ("letter-colon-start", "<answer>D: have lunch with friends</answer>", OBQA, "D"),
    ("bare-letter-paren-start", "B) because eating out is costly", OBQA, "B"),
    ("wrapped-in-sentence", "<answer>I pick (D) here.</answer>", OBQA, "D"),
    ("wrapped-twice-agree", "<answer>**B** (B)</answer>", OBQA, "B"),
    ("boxed", r"\boxed{B}", OBQA, "B"),
    ("boxed-latex", r"<answer>The final answer is $\boxed{\text{C}}$.</answer>", OBQA, "C"),
    ("boxed-in-reasoning", r"Eating out is the big cost, so $\boxed{B}$.", OBQA, "B"),
    # --- the option's text instead of its letter ----------------------------------------------
    ("text-after-cue", "<answer>The answer is quit eating lunch out</answer>", OBQA, "B"),
    ("text-whole-span", "<answer>quit eating lunch out.</answer>", OBQA, "B"),
    ("text-normalised", "<answer>QUIT eating lunch-out!</answer>", OBQA, "B"),
    ("text-quoted-after-cue", 'The answer is "buy less with monopoly money".', OBQA, "C"),
    ("text-inside-span", "<answer>They should quit eating lunch out to save money</answer>", OBQA, "B"),
    ("letter-and-matching-text", "The answer is B (quit eating lunch out).", OBQA, "B"),
    ("paren-letter-and-matching-text", "<answer>(D) have lunch with friends</answer>", OBQA, "D"),
    ("number-after-cue", "3 times 5 is 15, so the answer is 15.", NUM, "B"),
    ("number-whole-span", "<answer>18</answer>", NUM, "C"),
    ("number-boxed", r"\boxed{21}", NUM, "D"),
    ("number-letter-and-value", "The answer is B (15).", NUM, "B"),
    ("number-not-a-prefix", "The answer is 150.", NUM, None),
    ("longest-option-wins", "<answer>We should have lunch with friends</answer>", NESTED, "B"),
    ("yes-no-text", "<answer>No</answer>", TWO, "B"),
    ("lowercase-word-made-of-letters", "<answer>hi</answer>", ["hi", "bye"], "A"),
    # --- the last stated answer counts --------------------------------------------------------
    ("changed-mind", "The answer is A. ... wait, the answer is C.", OBQA, "C"),
    ("changed-mind-in-span", "<answer>The answer is A. No, the answer is D.</answer>", OBQA, "D"),
    ("last-answer-span", "<answer>The answer is B</answer>\n<answer>The answer is C</answer>", OBQA, "C"),
    (
        "span-beats-reasoning",
        "<think>I first thought the answer is A.</think><answer>The answer is C.</answer>",
        OBQA,
        "C",
    ),
    ("boxed-after-cue", r"The answer is A at first sight, but checking again: \boxed{D}", OBQA, "D"),
    ("later-cue-without-letter", "The answer is B. This option is the best one.", OBQA, "B"),
    ("later-mention-not-a-cue", "The answer is A. Option C is wrong.", OBQA, "A"),
    ("cue-beats-wrapped-letter", "<answer>The answer is B. (A) is wrong.</answer>", OBQA, "B"),
    # --- answers outside the tags ------------------------------------------------------------
    ("plain-so-answer", "Spending less on food saves money. So the answer is D.", OBQA, "D"),
    ("after-think-bare", THINK + "\nB", OBQA, "B"),
    ("after-think-cue", "<think>maybe the answer is A</think> So the answer is D.", OBQA, "D"),
    ("unclosed-answer-stop-string", THINK + "<answer>The answer is D.", OBQA, "D"),
    ("cue-inside-unfinished-think", "<think>Eating out costs a lot, so the answer is B", OBQA, "B"),
    ("contraction-before-cue", "I'm sure the answer is B", OBQA, "B"),
    ("pronoun-before-cue", "<answer>I think the answer is B</answer>", TEN, "B"),
    ("letter-i-in-range", "The answer is I.", TEN, "I"),
    ("letter-j", "<answer>The answer is J.</answer>", TEN, "J"),
    ("two-options", "<answer>The answer is B.</answer>", TWO, "B"),
    # --- wider phrasings (issue 14): dashes, first-person choices, a letter's own verdict --------
    ("dash-cue", "Answer - C", OBQA, "C"),
    ("dash-cue-lowercase", "Answer - c", OBQA, "C"),
    ("en-dash-cue", "Answer – D", OBQA, "D"),
    ("arrow-cue", "Answer -> B", OBQA, "B"),
    ("double-dash-shouted", "ANSWER -- B", OBQA, "B"),
    ("correct-answer-dash", "Correct answer - D", OBQA, "D"),
    ("i-choose-after-alternatives", "It's not A or B, so I choose C.", OBQA, "C"),
    ("go-with-after-alternatives", "Between A and C, I'll go with C.", OBQA, "C"),
    ("would-choose", "I would choose D.", OBQA, "D"),
    ("pick", "I'll pick B.", OBQA, "B"),
    ("go-with-the-option", "I'd go with the option B.", OBQA, "B"),
    ("choose-in-span", "<answer>I choose C.</answer>", OBQA, "C"),
    ("correct-one", "Not A, not B: the correct one is D.", OBQA, "D"),
    ("choice-here-would-be", "So the best choice here would be C) buy less with monopoly money.", OBQA, "C"),
    ("letter-is-correct", "B is correct.", OBQA, "B"),
    ("option-letter-is-correct", "Option C is correct.", OBQA, "C"),
    ("letter-is-the-correct-answer", "Therefore, B is the correct answer.", OBQA, "B"),
    ("others-wrong-then-verdict", "A and B are wrong; C is correct.", OBQA, "C"),
    ("alternatives-then-verdict", "A and B are both plausible, but B is the correct answer.", OBQA, "B"),
    ("paren-letter-in-sentence", "I think B) is correct.", OBQA, "B"),
    ("paren-letter-in-span", "<answer>It has to be B) since eating out costs money.</answer>", OBQA, "B"),
    ("paren-letter-label-verdict", "B) quit eating lunch out is the best way to save money.", OBQA, "B"),
    ("paren-letter-is-the-answer-span", "<answer>B) is the answer</answer>", OBQA, "B"),
    ("wrapped-i-is-correct", "(I) is correct.", TEN, "I"),
    ("verdict-in-think-answer-in-span", "<think>A is correct? no</think><answer>The answer is B.</answer>", OBQA, "B"),
    ("best-sounding-not-a-verdict", "C is the best-sounding option but the answer is B.", OBQA, "B"),
    ("im-going-with", "I'm going with B.", OBQA, "B"),
    ("we-are-going-with-wrapped", "We're going with (D) since it costs nothing.", OBQA, "D"),
    ("paren-letter-label-mid-sentence", "The best option is B) quit eating lunch out, since it saves money.", OBQA, "B"),
    ("dash-cue-then-label", "Answer - B) quit eating lunch out", OBQA, "B"),
    ("alternatives-named-then-verdict", "Between A and C, C is correct.", OBQA, "C"),
    ("alternatives-ruled-out-then-verdict", "Not A or B, C is correct.", OBQA, "C"),
    ("either-or-then-answer", "Either B or C is correct, but the answer is C.", OBQA, "C"),
    ("among-all-then-verdict", "Among A, B, C and D, B is the best choice.", OBQA, "B"),
    # --- nothing usable: None ------------------------------------------------------------------
    ("empty", "", OBQA, None),
    ("whitespace", "  \n ", OBQA, None),
    ("empty-answer-span", "<answer></answer>", OBQA, None),
    ("empty-span-despite-reasoning", "<think>the answer is B</think><answer> </answer>", OBQA, None),
    ("no-answer", "<think>Eating out is expensive.</think>", OBQA, None),
    ("two-letters-and", "The answer is A and C", OBQA, None),
    ("two-letters-comma", "A, B", OBQA, None),
    ("two-letters-joined", "AC", OBQA, None),
    ("two-letters-or-wrapped", "<answer>The answer is (A) or (B)</answer>", OBQA, None),
    ("two-letters-span-periods", "<answer>A. B. C.</answer>", OBQA, None),
    ("two-letters-lowercase", "<answer>a and c</answer>", OBQA, None),
    ("two-letters-boxed", r"\boxed{A, C}", OBQA, None),
    ("two-wrapped-disagree", "<answer>(B) because (A) is wrong</answer>", OBQA, None),
    ("beyond-options", "E", OBQA, None),
    ("beyond-options-cue", "<answer>The answer is E.</answer>", OBQA, None),
    ("beyond-two-options", "The answer is C.", TWO, None),
    ("last-statement-bad", "The answer is B. Hmm, actually the answer is A and C.", OBQA, None),
    ("article-a-sentence", "<answer>A cat is an animal.</answer>", OBQA, None),
    ("article-after-cue", "I guess the answer is a bit unclear here", OBQA, None),
    ("lowercase-letter-then-word", "Answer: a cat", OBQA, None),
    ("pronoun-i-span", "<answer>I am not sure.</answer>", TEN, None),
    ("pronoun-i-contraction", "<answer>I'm not sure.</answer>", TEN, None),
    ("pronoun-i-after-cue", "Answer: I would rather not say.", TEN, None),
    ("pronoun-i-comma-after-cue", "The answer is, I believe, unclear.", TEN, None),
    ("word-starting-with-letter", "The answer is Because of money", OBQA, None),
    ("shouted-word-not-letters", "The answer is ACTUALLY unclear", OBQA, None),
    ("loose-letter-no-cue", "<answer>I think it's B</answer>", OBQA, None),
    ("loose-letter-free-text", "Option B looks good and so does A.", OBQA, None),
    ("letter-contradicts-text", "The answer is A (quit eating lunch out).", OBQA, None),
    ("paren-letter-contradicts-text", "<answer>(A) quit eating lunch out</answer>", OBQA, None),
    ("number-contradicts-letter", "The answer is A (15).", NUM, None),
    ("two-option-texts", "<answer>make more phone calls or have lunch with friends</answer>", OBQA, None),
    ("two-numbers-in-span", "<answer>18 minus 3 is 15</answer>", NUM, None),
    ("partial-option-text", "<answer>lunch out</answer>", OBQA, None),
    ("text-of-no-option", "<answer>The answer is sell the car.</answer>", OBQA, None),
    ("choose-between-two", "I choose between A and C.", OBQA, None),
    ("choose-two", "I choose A or C.", OBQA, None),
    ("choose-a-word", "I choose a different plan.", OBQA, None),
    ("choose-no-letter", "I choose to save money.", OBQA, None),
    ("went-with-no-letter", "We went with the cheapest plan.", OBQA, None),
    ("two-letters-are-correct", "A and C are correct.", OBQA, None),
    ("either-letter-is-correct", "B or C is correct.", OBQA, None),
    ("either-wrapped-is-the-right-answer", "(B) or (C) is the right answer.", OBQA, None),
    ("one-of-three-is-correct", "A, B or C is correct.", OBQA, None),
    ("going-with-two", "I'm going with A or C.", OBQA, None),
    ("going-with-no-letter", "I'm going with a different plan.", OBQA, None),
    ("both-are-correct", "Both A and C are correct.", OBQA, None),
    ("letter-is-not-correct", "A is not correct.", OBQA, None),
    ("letter-is-incorrect", "A is incorrect, B is wrong.", OBQA, None),
    ("right-is-not-a-verdict", "A is right out.", OBQA, None),
    ("pronoun-would-be-best", "I would be the best judge of that.", TEN, None),
    ("pronoun-is-correct", "I is correct.", TEN, None),
    ("label-contradicts-verdict", "A) quit eating lunch out is correct", OBQA, None),
    ("question-not-verdict", "Is A the correct answer? No. B is.", OBQA, None),
    ("hyphenated-answer-word", "answer-based reasoning says B", OBQA, None),
    ("two-paren-labels-in-span", "<answer>A) make more phone calls B) quit eating lunch out</answer>", OBQA, None),
]


@pytest.mark.parametrize(("text", "options", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_extract_choice(text, options, expected):
    assert extract_choice(text, options) == expected


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("n", [0, 1, 11])
def test_option_count_outside_schema_is_a_caller_error(n):
    with pytest.raises(ValueError, match="2 to 10 options"):
        extract_choice("The answer is A.", [f"o{i}" for i in range(n)])


def test_every_letter_of_ten_options_reads_back():
    for letter in "ABCDEFGHIJ":
        assert extract_choice(f"{THINK}<answer>The answer is {letter}.</answer>", TEN) == letter


def test_answer_span_takes_the_last_tag_closed_or_not():
    assert answer_span("no tags") is None
    assert answer_span("<answer>A</answer> x <answer>B</answer>") == "B"
    assert answer_span("<answer>A</answer><answer>The answer is C.") == "The answer is C."
    assert answer_span("<answer></answer>") == ""


def test_normalize_ignores_case_spaces_and_punctuation():
    assert normalize("  Quit eating,  LUNCH-out! ") == "quit eating lunch out"
