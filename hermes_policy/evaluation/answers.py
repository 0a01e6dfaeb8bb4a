"""Multiple-choice answers: which option an annotation names, and which one a model chose.

Reference answers (:func:`correct_choice`)
    The annotation's ``answer`` is either the text of one option (compared without case,
    surrounding spaces and punctuation; an option's own leading letter, as VideoMME writes
    ``"A. apples"``, may be left out) or its letter (``"B"``, ``"(B)"``, ``"b."``). Option
    text is tried first, so options that are themselves letters still work. Anything else
    raises :class:`~hermes_policy.inputs.annotations.AnnotationError` naming the entry.

Model outputs (:func:`parse_choice`), tried in this order; the first rule that decides wins:

1. the whole output is a letter: ``B``, ``(B)``, ``B.``, ``[b]``;
2. an answer phrase: ``Answer: B``, ``The answer is (b)``, ``the correct answer is C.``,
   then the weaker ``option B`` / ``choice (c)``; a bare lower-case letter counts only
   when followed by ``.``, ``)``, ``:``, ``,`` or the end (so "the answer is a red circle"
   is not option A);
3. a leading letter with a delimiter: ``B. blue``, ``(B) blue``, ``C) ...``, ``D: ...``,
   or a leading capital followed by that option's own text (``B blue``);
4. option text: the output equals one option, or mentions exactly one option as whole
   words (an option contained in a longer mentioned option, "red" in "dark red", yields to
   it);
5. a single standalone capital letter (or parenthesised letter) of a valid option
   anywhere in the output.

Only letters of existing options count. Chat-template debris (``<|im_end|>``, ``</s>``),
markdown emphasis and quotes around the output are ignored. Anything else is unparseable:
``None``, reported as such and scored wrong.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from hermes_policy.evaluation.prompts import LETTERS, option_texts
from hermes_policy.inputs.annotations import AnnotationError, Question

_SPECIAL_TOKENS = re.compile(r"<\|[^|>]*\|>|</?s>|<pad>|<unk>|<eos>|<bos>", re.I)
_DECORATION = re.compile(r"[*_`\"\u201c\u201d\u2018\u2019]")
_WHOLE_LETTER = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:,;!]?")
_LETTER_SPEC = re.compile(r"\(?\s*([A-Za-z])\s*\)?\s*[.:)]?")
_LETTER_FORMS = (
    r"(?:[(\[]\s*([A-Za-z])\s*[)\]]"  # (b) [B]
    r"|([A-Z])(?![A-Za-z0-9'])"  # B  (not the start of a word)
    r"|([a-z])(?=\s*[.):,](?![A-Za-z0-9])|\s*$))"  # b.  b)  b at the end
)
# Keywords ignore case; the letter forms must not (a bare "a" is an article, "A" a letter).
_ANSWER_PHRASE = re.compile(
    r"(?i:\banswers?\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)\s*(?:[:=\-]\s*)?"
    r"(?i:(?:option|choice|letter)\s+)?" + _LETTER_FORMS
)
_OPTION_PHRASE = re.compile(r"(?i:\b(?:option|choice))\s*(?:[:=\-]\s*)?" + _LETTER_FORMS)
_LEADING = re.compile(r"^(?:[(\[]\s*([A-Za-z])\s*[)\]]|([A-Z])\s*[.):]|([A-Z])\s+-\s)")
_LEADING_BARE = re.compile(r"^([A-Z])\s+(\S.*)$", re.S)
_ANYWHERE = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]|(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, one space between words (Unicode NFKC first)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch if ch.isalnum() else " " for ch in text)
    return " ".join(text.split())


def clean_output(text: str) -> str:
    """A model output without template tokens, markdown emphasis, quotes and outer spaces."""
    text = _SPECIAL_TOKENS.sub(" ", unicodedata.normalize("NFKC", text))
    text = _DECORATION.sub("", text)
    return " ".join(text.split())


def _index(letter: str | None, count: int) -> int | None:
    if not letter:
        return None
    index = LETTERS.find(letter.upper())
    return index if 0 <= index < count else None


def _first_letter(match: re.Match[str]) -> str | None:
    return next((g for g in match.groups() if g), None)


def correct_choice(question: Question, where: str) -> int | None:
    """Index of the right option of a multiple-choice question (None for open-ended).

    Raises
    ------
    AnnotationError
        The question has choices but no answer, or an answer that is neither one of the
        options nor the letter of one; the message starts with ``where``.
    """
    if not question.choices:
        return None
    if question.answer is None or not question.answer.strip():
        raise AnnotationError(f"{where}: a multiple-choice question needs an 'answer'")
    answer = normalize_text(question.answer)
    for i, (raw, text) in enumerate(zip(question.choices, option_texts(question.choices))):
        if answer and answer in (normalize_text(raw), normalize_text(text)):
            return i
    match = _LETTER_SPEC.fullmatch(question.answer.strip())
    index = _index(match.group(1), len(question.choices)) if match else None
    if index is None:
        raise AnnotationError(
            f"{where}: answer {question.answer!r} is not among the choices "
            f"{list(question.choices)} (give the option's text or its letter)"
        )
    return index


def _mentioned(text: str, options: list[str]) -> set[int]:
    padded = f" {text} "
    return {i for i, option in enumerate(options) if option and f" {option} " in padded}


def parse_choice(output: str, choices: Sequence[str]) -> int | None:
    """Index of the option a model output picks, or None when it cannot be told.

    See the module docstring for the rules and their order.
    """
    count = len(choices)
    text = clean_output(output)
    if not text or count == 0:
        return None
    # 1. nothing but a letter
    match = _WHOLE_LETTER.fullmatch(text)
    if match and (index := _index(match.group(1), count)) is not None:
        return index
    # 2. answer phrases, then option / choice phrases
    for phrase in (_ANSWER_PHRASE, _OPTION_PHRASE):
        for match in phrase.finditer(text):
            if (index := _index(_first_letter(match), count)) is not None:
                return index
    # 3. a leading letter with a delimiter, or followed by its own option text
    options = [normalize_text(o) for o in option_texts(choices)]
    match = _LEADING.match(text)
    if match and (index := _index(_first_letter(match), count)) is not None:
        return index
    match = _LEADING_BARE.match(text)
    if match and (index := _index(match.group(1), count)) is not None:
        rest = normalize_text(match.group(2))
        if options[index] and (rest == options[index] or rest.startswith(options[index] + " ")):
            return index
    # 4. option text
    said = normalize_text(text)
    exact = [i for i, option in enumerate(options) if option and said == option]
    if len(exact) == 1:
        return exact[0]
    found = _mentioned(said, options)
    found = {i for i in found if not any(j != i and f" {options[i]} " in f" {options[j]} " for j in found)}
    if len({options[i] for i in found}) == 1:
        return min(found)
    if found:
        return None  # several different options mentioned: ambiguous
    # 5. one standalone letter anywhere
    letters = {_index(_first_letter(m), count) for m in _ANYWHERE.finditer(text)}
    letters.discard(None)
    if len(letters) == 1:
        return letters.pop()
    return None
