"""Every piece of prompt text in tars, in one place (DESIGN.md §2).

The speech and text conditions must differ *only* in how the question reaches the model: the same
system prompt asks for the same think/answer format in both, the text prompt shows the question with
lettered options, and the speech prompt is the audio alone (it carries the question and the options,
read aloud as `spoken_text` writes them).
"""

from __future__ import annotations

from tars.data.schema import LETTERS, Record

SYSTEM_PROMPT = (
    "You are a careful assistant answering multiple-choice questions. "
    "First think step by step inside <think> </think>. "
    "Then give the final answer inside <answer> </answer> as 'The answer is X.', "
    "where X is the letter of the correct option."
)

#: Shown before the lettered options in the text condition.
TEXT_TEMPLATE = "{question}\n\n{options}"
#: The user turn of the speech condition beside the audio: no words that would leak the question.
SPEECH_INSTRUCTION = ""

#: The completion format that `format_score` gives 1.0.
ANSWER_TEMPLATE = "<think>{reasoning}</think><answer>The answer is {letter}.</answer>"


def letters_for(options: list[str]) -> str:
    if not 1 <= len(options) <= len(LETTERS):
        raise ValueError(f"need 1 to {len(LETTERS)} options, got {len(options)}")
    return LETTERS[: len(options)]


def lettered_options(options: list[str]) -> str:
    """`A. first\\nB. second…`: the option block of the text prompt."""
    return "\n".join(f"{l}. {o}" for l, o in zip(letters_for(options), options))


def text_prompt(rec: Record) -> str:
    """The user turn of the text condition."""
    return TEXT_TEMPLATE.format(question=rec.question, options=lettered_options(rec.options))


def spoken_text(rec: Record) -> str:
    """What the synthesiser reads aloud, VoiceBench style: the question, then `A, …. B, ….`.

    Options get a closing full stop so the voice pauses between them (an option ending in `?`, `!`
    or `.` keeps its own mark).
    """
    q = rec.question.strip()
    if q[-1] not in ".?!:":
        q += "."
    parts = [q]
    for l, o in zip(letters_for(rec.options), rec.options):
        o = o.strip()
        parts.append(f"{l}, {o}" + ("" if o[-1] in ".?!" else "."))
    return " ".join(parts)


def gold_completion(rec: Record, reasoning: str | None = None) -> str:
    """A completion in the exact target format, from the record's gold chain of thought (for SFT)."""
    return ANSWER_TEMPLATE.format(reasoning=(reasoning or rec.cot or "").strip(), letter=rec.answer)
