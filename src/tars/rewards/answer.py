"""Read which option a model chose out of its completion: the correctness half of the reward.

An RL reward is only as good as its parser. A lenient parser that *guesses* (reads the article "A" as
option A, picks one of two stated letters, falls back to an answer the model later took back) pays
the policy for text that does not state a choice, and the policy learns to exploit exactly that. So
every rule here reads a choice only where the model clearly *stated* one, and anything unclear is
`None`, which the reward counts as wrong.

Where to look (`extract_choice`):

1. The content of the last `<answer>` tag, up to its `</answer>` or, when the tag was never closed
   (generation stopped on the `</answer>` stop string, or was cut off), to the end of the text. When
   the text has an `<answer>` tag, that content is authoritative: an empty one is no answer, even if
   the reasoning named a letter.
2. Without an `<answer>` tag, the whole text, through explicit cues only (below); the text after the
   last `</think>` (or the whole text) may also *be* the answer (`B`, `(B)`, `B) …`).

What counts as a stated choice, strongest first:

* An explicit cue, `answer is`, `Answer:`, `Answer - `, `final answer`, `correct option is`, `the
  correct one is`, `choice is`, a first-person choice (`I choose`, `I'll go with`, `I'm going with`,
  `we pick`), …, then an option's text or a letter (`option C`, `(C)`, `**C**`); `\\boxed{…}`; and a
  letter's own verdict, `B is correct`, `(C) is the right answer`, `B) <B's text> is the best` (several letters
  declared correct at once, `A and C are correct`, `B or C is correct`, are unusable). Of several, the
  last one in the text wins, so "The answer is A. … wait, the answer is C." is C. If that last one
  is unusable (two letters, a letter beyond the options) the answer is `None`: the model's final
  word is what counts, so there is no falling back to a statement it took back.
* The whole span is one letter (any case, wrappers and punctuation trimmed), or exactly one option's
  text.
* Only inside an `<answer>` span: an upper-case letter wrapped as `(X)`, `[X]`, `**X**`, closed as
  `X)` anywhere (`It has to be B) since …`), or labelled `X.` / `X:` at the start of the span. They
  must all agree.
* Only inside an `<answer>` span: an option's text appearing in it (case, spaces and punctuation
  normalised, whole words); an option contained in a longer matching option loses to it; two options
  named → `None`.

Words are not letters: a capital letter after a cue must not run into more letters (`Because`), an
`I` followed by a word is the pronoun, and a lower-case letter counts only after a cue and only when
nothing but punctuation follows it (`Answer: b.`, not `the answer is a bit unclear`). A letter
followed by an option's text (`(A) quit eating lunch out`) must name that option, else `None`.
"""

from __future__ import annotations

import re

from tars.data.schema import LETTERS, MAX_OPTIONS, MIN_OPTIONS

#: A reading meaning "a choice was stated, but it is unusable": several letters, a letter beyond the
#: options, a letter contradicting the option text beside it. It ends the search with `None`.
_BAD = "!"

_ANSWER_OPEN = re.compile(r"<answer\s*>", re.I)
_ANSWER_CLOSE = re.compile(r"</answer\s*>", re.I)
_THINK_CLOSE = re.compile(r"</think\s*>", re.I)
_ANY_TAG = re.compile(r"</?(?:think|answer)\s*>", re.I)

_CONNECTOR = (r"(?:\s+(?:is|would\s+be|should\s+be|must\s+be|will\s+be)\b"
              r"|\s*\**\s*(?:[:=]|-{1,2}>?|[–—→]))")
#: An explicit answer cue; the letter or option text comes right after it (past `_FILLER`).
_CUE = re.compile(
    rf"\bfinal\s+answer\b{_CONNECTOR}?|\b(?:(?:correct|right|best)\s+)?(?:answer|option|choice)(?:\s+(?:here|now|then|overall))?{_CONNECTOR}"
    rf"|\b(?:correct|right|best)\s+one{_CONNECTOR}"
    # A first-person choice: "I choose C", "I'll go with B", "we would pick (D)".
    r"|\b(?:I|we)(?:\s+(?:would|will|shall)|['’](?:ll|d))?\s+(?:(?:choose|chose|pick|picked|select|selected)\b"
    r"|(?:go|went)\s+with\b|opt\s+for\b)"
    # "I'm going with B", "we are going with (C)".
    r"|\b(?:I['’]m|I\s+am|we['’]re|we\s+are)\s+going\s+with\b",
    re.I,
)
#: A letter stating itself the choice: "B is correct", "(C) is the right answer", "option D is the
#: best one", "B) quit eating lunch out is correct" (a label's option text may sit between).
_POSTFIX_LETTER = re.compile(r"(?<![A-Za-z0-9'’])((?i:option|choice)\s+)?([(\[*]*)([A-J])([)\]*]*)(?=[\s,)\]*])")
_POSTFIX_VERDICT = re.compile(
    r"^[\s*_,]*(?:is|would\s+be|should\s+be|must\s+be)\s+(?:clearly\s+|definitely\s+|indeed\s+)?"
    r"(?:the\s+)?(?:(?:correct|right|best)(?=\s*(?:[.!?,;:)\n]|$)"
    r"|\s+(?:answer|option|choice|one|way|here|because|since|as|for)\b)|answer\b)",
    re.I,
)
#: Several letters declared correct at once ("A and C are correct"): a stated but unusable choice.
_POSTFIX_PLURAL = re.compile(
    r"(?<![A-Za-z0-9'’])[(\[*]*[A-J][)\]*]*(?:\s*(?:,|and|or|&)\s*[(\[*]*[A-J][)\]*]*)+\s+are\s+(?:both\s+|all\s+)?"
    r"(?:the\s+)?(?:correct|right|best)\b"
    # "B or C is correct": alternatives joined by "or" take a singular verb, and are as unusable.
    r"|(?<![A-Za-z0-9'’])[(\[*]*[A-J][)\]*]*(?:\s*,\s*[(\[*]*[A-J][)\]*]*)*,?\s+or\s+[(\[*]*[A-J][)\]*]*"
    r"\s+(?:is|would\s+be|should\s+be|must\s+be)\s+(?:the\s+)?(?:correct|right|best)\b"
)
#: What may stand between a cue and the choice: spaces, markdown, LaTeX wrappers, opening brackets
#: and quotes, and a few words that do not change the statement ("the answer is clearly option C").
_FILLER = re.compile(
    r"(?:\s+|[:=,\-–—$*_(\[\"'`]|\\boxed\s*\{|\\(?:text|textbf|mathrm|mathbf)\s*\{"
    r"|\b(?:therefore|thus|hence|clearly|definitely|probably|likely|then|simply|indeed"
    r"|option|choice|letter|the)\b)*",
    re.I,
)
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{)?([^{}]*)\}")

_SEP = r"(?:\s*[,;/&+]\s*(?:(?:and|or)\s+)?|\s+(?:and|or)\s+)"
_CLOSE = r"[)\]\"'`*_}$]*"
#: Upper-case letters after a cue: one (`C`), or several at once (`A and C`, `A, B`, `AC`), not
#: running into a word (`Because`) or a contraction (`I'm`).
_UPPER_RUN = re.compile(
    rf"[A-J](?:[)\]*]*{_SEP}[(\[*]*[A-J]|[A-J])*{_CLOSE}(?![A-Za-z0-9]|['’][a-z])"
)
#: Lower-case letters after a cue count only when punctuation or the end follows: `Answer: b.`.
_LOWER_RUN = re.compile(rf"[a-j](?:[)\]*]*{_SEP}[(\[*]*[a-j])*{_CLOSE}(?=\s*(?:$|[.!?;,\n]))")
#: `I` followed by a word (`I think`, `I, for one, …`) is the pronoun.
_PRONOUN = re.compile(r"I\s*,?\s+[a-z]")
#: A letter labelling the start of a span: `B)`, `(B)`, `B.`, `B:` (not `A.I.` or `A cat`).
_LEADING = re.compile(r"^[\s*_]*[(\[]?([A-J])(?:[)\]]|[.:](?=[\s*_]|$))")
#: A wrapped upper-case letter anywhere in an answer span.
#: (`B)` counts too when it starts a word: `It has to be B) since …`, not `(AB)` or `A.B)`.)
_WRAPPED = re.compile(r"\(([A-J])\)|\[([A-J])\]|\*\*([A-J])\*\*|__([A-J])__|(?<![\w(.])([A-J])\)")
#: What may sit between a letter and the option text it labels: `(A) text`, `A: text`, `A - text`.
_LABEL_GAP = re.compile(r"^[\s:\-–—)\]}(*_]*")
#: A letter followed by a sentence end or a comma ends its statement; what follows is not its label.
_STATEMENT_END = re.compile(r"^\s*[.,;!?]")

_TRIM = " \t\r\n*_()[]{}.:;,!?\"'`$"
_OPTION_WORD = re.compile(r"^(?:option|choice|letter)\s+", re.I)
_WORD = re.compile(r"[^\W_]+")
_LETTER_RUN = re.compile(r"[A-J]+")
_NON_WORD = re.compile(r"[^\w]+")
_AND_OR = re.compile(r"\b(?:and|or)\b")


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, runs of spaces to one: how option texts are compared."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def answer_span(text: str) -> str | None:
    """The content of the last `<answer>` tag, or None when there is none.

    The content runs to the next `</answer>`, or to the end of the text when the tag is unclosed (a
    generation stopped on the `</answer>` stop string still states its answer).
    """
    opens = list(_ANSWER_OPEN.finditer(text))
    if not opens:
        return None
    rest = text[opens[-1].end() :]
    close = _ANSWER_CLOSE.search(rest)
    return rest[: close.start()] if close else rest


def _judge(letters: str, n: int) -> str:
    """One distinct letter within the options, or `_BAD`."""
    distinct = set(letters.upper())
    if len(distinct) != 1:
        return _BAD
    (letter,) = distinct
    return letter if LETTERS.index(letter) < n else _BAD


def _one_of(found: set[str]) -> str | None:
    """Readings that must agree: none → None, one → it, any disagreement or bad one → `_BAD`."""
    if not found:
        return None
    return found.pop() if len(found) == 1 and _BAD not in found else _BAD


def _option_prefix(text: str, norm_options: list[str]) -> str | None:
    """The option whose whole text starts `text` (longest wins; two equal ones → `_BAD`)."""
    nt = normalize(text)
    hits = [(len(o), LETTERS[i]) for i, o in enumerate(norm_options) if o and (nt + " ").startswith(o + " ")]
    if not hits:
        return None
    longest = max(length for length, _ in hits)
    return _one_of({letter for length, letter in hits if length == longest})


def _option_equal(text: str, norm_options: list[str]) -> str | None:
    """The option whose text is exactly `text`, normalised (duplicated options → `_BAD`)."""
    nt = normalize(text)
    return _one_of({LETTERS[i] for i, o in enumerate(norm_options) if o and o == nt}) if nt else None


def _occurrences(haystack: str, needle: str) -> list[tuple[int, int]]:
    """Where `needle` occurs in `haystack`, overlaps included, as (start, end) pairs."""
    found, at = [], haystack.find(needle)
    while at >= 0:
        found.append((at, at + len(needle)))
        at = haystack.find(needle, at + 1)
    return found


def _option_inside(text: str, norm_options: list[str]) -> str | None:
    """The one option whose text occurs in `text` as whole words, ignoring occurrences inside an
    occurrence of a longer option (`lunch` inside `have lunch with friends`); two → `_BAD`."""
    padded = f" {normalize(text)} "
    where = {i: _occurrences(padded, f" {o} ") for i, o in enumerate(norm_options) if o}

    def covered(i: int, start: int, end: int) -> bool:
        return any(
            len(norm_options[j]) > len(norm_options[i]) and s <= start and end <= e
            for j, spans in where.items()
            for s, e in spans
        )

    return _one_of({LETTERS[i] for i, spans in where.items() if any(not covered(i, s, e) for s, e in spans)})


def _check_label(letter: str, after: str, norm_options: list[str]) -> str:
    """`letter`, unless the text right after it is another option's text (`(A) <text of B>`)."""
    if letter == _BAD or _STATEMENT_END.match(after):
        return letter
    labelled = _option_prefix(after[_LABEL_GAP.match(after).end() :], norm_options)
    return letter if labelled is None or labelled == letter else _BAD


def _letter_at(text: str, n: int, norm_options: list[str]) -> str | None:
    """The letter(s) starting `text`, right after a cue and its filler."""
    if _PRONOUN.match(text):
        return None
    m = _UPPER_RUN.match(text) or _LOWER_RUN.match(text)
    if m is None:
        return None
    letters = "".join(c for c in _AND_OR.sub(" ", m.group()) if c.isalpha())
    return _check_label(_judge(letters, n), text[m.end() :], norm_options)


def _after_cue(text: str, n: int, norm_options: list[str]) -> str | None:
    """What a cue states: an option's text, else a letter; None when it states neither."""
    body = text[_FILLER.match(text).end() :]
    by_text = _option_prefix(text, norm_options) or _option_prefix(body, norm_options)
    return by_text or _letter_at(body, n, norm_options)


def _letters_only(core: str) -> str | None:
    """The letters when `core` is nothing but option letters: `B`, `b`, `A, B`, `a and c`, `AC`."""
    words = [w for w in _WORD.findall(core) if w not in ("and", "or")]
    if len(words) == 1 and _LETTER_RUN.fullmatch(words[0].upper() if len(words[0]) == 1 else words[0]):
        return words[0]
    if len(words) > 1 and all(len(w) == 1 and w.upper() in LETTERS for w in words):
        return "".join(words)
    return None


def _whole(span: str, n: int, norm_options: list[str]) -> str | None:
    """The span is, as a whole, letters only (one: that letter, any case; several: `_BAD`) or
    exactly one option's text."""
    letters = _letters_only(_OPTION_WORD.sub("", span.strip(_TRIM)))
    return _judge(letters, n) if letters else _option_equal(span, norm_options)


def _leading(span: str, n: int, norm_options: list[str]) -> str | None:
    """A letter labelling the start of the span (`B) …`, `B. …`), checked against its label text."""
    m = _LEADING.match(span)
    return _check_label(_judge(m.group(1), n), span[m.end() :], norm_options) if m else None


def _skip_option_text(text: str, norm_options: list[str]) -> tuple[str | None, str]:
    """(the option whose whole text starts `text` — longest wins —, the text after it), or
    (None, `text`) when no option's text starts it."""
    letter = _option_prefix(text, norm_options)
    if letter is None or letter == _BAD:
        return letter, text
    words = len(norm_options[LETTERS.index(letter)].split())
    ends = [m.end() for m in re.finditer(r"\w+", text)]
    return letter, text[ends[words - 1]:]


def _postfix_readings(text: str, n: int, norm_options: list[str]) -> list[tuple[int, str]]:
    """Letters that declare themselves the choice (`B is correct`, `(C) is the right answer`,
    `B) <its option text> is the best`), and several at once (`A and C are correct`, `_BAD`), with
    their positions. A bare `I` is the pronoun (`I would be the best judge`), never option I."""
    plural = [m.span() for m in _POSTFIX_PLURAL.finditer(text)]
    found = [(start, _BAD) for start, _ in plural]
    for m in _POSTFIX_LETTER.finditer(text):
        if any(start <= m.start() < end for start, end in plural):
            continue  # one of the several letters declared correct at once (`B or C is correct`)
        named, opening, letter, closing = m.groups()
        if letter == "I" and not (named or opening or closing):
            continue
        rest = text[m.end():]
        if closing and not _STATEMENT_END.match(rest):
            labelled, after = _skip_option_text(rest[_LABEL_GAP.match(rest).end():], norm_options)
            if labelled is not None:
                if not _POSTFIX_VERDICT.match(after):
                    continue
                found.append((m.start(), letter if labelled == letter else _BAD))
                continue
        if _POSTFIX_VERDICT.match(rest):
            found.append((m.start(), _judge(letter, n)))
    return found


def _cue_readings(text: str, n: int, norm_options: list[str]) -> list[str]:
    """Every choice stated through a cue, `\\boxed{}` or a letter's own verdict, in text order."""
    found: list[tuple[int, str]] = []
    for m in _CUE.finditer(text):
        reading = _after_cue(text[m.end() :], n, norm_options)
        if reading is not None:
            found.append((m.start(), reading))
    for m in _BOXED.finditer(text):
        inner = m.group(1)
        reading = _whole(inner, n, norm_options) or _leading(inner, n, norm_options)
        if reading is not None:
            found.append((m.start(), reading))
    found += _postfix_readings(text, n, norm_options)
    return [reading for _, reading in sorted(found, key=lambda pair: pair[0])]


def _from_span(span: str, n: int, norm_options: list[str]) -> str | None:
    """The choice an `<answer>` span states (rules in the module docstring, strongest first)."""
    cued = _cue_readings(span, n, norm_options)
    if cued:
        return cued[-1]
    whole = _whole(span, n, norm_options)
    if whole is not None:
        return whole
    marked = {_leading(span, n, norm_options)} - {None}
    for m in _WRAPPED.finditer(span):
        letter = next(g for g in m.groups() if g)
        marked.add(_check_label(_judge(letter, n), span[m.end() :], norm_options))
    if marked:
        return _one_of(marked)
    return _option_inside(span, norm_options)


def _from_free_text(text: str, n: int, norm_options: list[str]) -> str | None:
    """The choice a text without `<answer>` tags states: the last cue, else a bare final answer."""
    cued = _cue_readings(text, n, norm_options)
    if cued:
        return cued[-1]
    closes = list(_THINK_CLOSE.finditer(text))
    tail = _ANY_TAG.sub(" ", text[closes[-1].end() :] if closes else text)
    return _whole(tail, n, norm_options) or _leading(tail, n, norm_options)


def extract_choice(text: str, options: list[str]) -> str | None:
    """The capital letter of the option `text` chooses, or None when it states no usable choice.

    None covers: no answer, an empty `<answer></answer>`, several letters at once (`A and C`,
    `A, B`, `AC`), a letter beyond the options, a letter contradicting the option text it labels,
    and two options named by their text. The reward counts None as wrong: an answer we cannot read
    unambiguously is never guessed. Raises ValueError when `options` does not hold 2 to 10 options
    (a caller's bug, not a model's mistake).
    """
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise ValueError(f"need {MIN_OPTIONS} to {MAX_OPTIONS} options, got {len(options)}")
    if not text or not text.strip():
        return None
    n, norm_options = len(options), [normalize(o) for o in options]
    span = answer_span(text)
    if span is not None:
        reading = _from_span(_ANY_TAG.sub(" ", span), n, norm_options) if span.strip() else None
    else:
        reading = _from_free_text(text, n, norm_options)
    return None if reading == _BAD else reading
