"""The text a model is asked for one benchmark question.

Multiple choice: the question, then one line per option, lettered ``(A)``, ``(B)``, ...,
then an instruction to answer with the letter only::

    What color is the square?
    (A) red
    (B) blue
    Answer with the option's letter from the given choices directly.

Open-ended: the question as written in the annotation file.

Options that already carry their own letters in order (VideoMME writes ``"A. apples"``)
are shown without them, so a prompt never reads ``(A) A. apples``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from hermes_policy.inputs.annotations import Question

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
PROMPT_VERSION = "eval-prompt/1"  # recorded in a run's config: changing prompts changes results

_OWN_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*[.):]\s*(.*)$", re.S)


def letter(index: int) -> str:
    """Letter of option ``index`` (0 -> ``A``)."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} has no letter (at most {len(LETTERS)} options)")
    return LETTERS[index]


def option_texts(choices: Sequence[str]) -> list[str]:
    """The options without their own leading letters, when every option carries one in order."""
    stripped = []
    for i, choice in enumerate(choices):
        match = _OWN_LETTER.match(choice)
        if match is None or match.group(1).upper() != LETTERS[i] or not match.group(2).strip():
            return [c.strip() for c in choices]
        stripped.append(match.group(2).strip())
    return stripped


def format_prompt(question: Question) -> str:
    """The text asked of the model for ``question`` (see the module docstring)."""
    if not question.choices:
        return question.question
    if len(question.choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options can be lettered, got {len(question.choices)}")
    lines = [question.question.strip()]
    lines += [f"({letter(i)}) {text}" for i, text in enumerate(option_texts(question.choices))]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)
