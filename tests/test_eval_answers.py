"""Evaluation: prompts, reading model outputs as a choice, and reference-answer validation."""

from __future__ import annotations

import json

import pytest

from hermes_policy.evaluation.answers import correct_choice, parse_choice
from hermes_policy.evaluation.prompts import MC_INSTRUCTION, format_prompt, option_texts
from hermes_policy.evaluation.runner import check_benchmark
from hermes_policy.inputs.annotations import AnnotationError, Question, load_annotations

CHOICES = ["red", "blue", "green", "dark red"]

# (model output, expected letter or None): outputs of the kind real models write.
OUTPUTS = [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("b", "B"),
    ("[C]", "C"),
    ("  \n B) blue<|im_end|>", "B"),
    ("<|im_start|>assistant\nB<|im_end|>", "B"),
    ("C</s>", "C"),
    ("**C**", "C"),
    ("Answer: B", "B"),
    ("answer: d", "D"),
    ("ANSWER: (a)", "A"),
    ("The answer is (b)", "B"),
    ("The answer is B.", "B"),
    ("The correct answer is: C.", "C"),
    ("I think the answer is C because the square turns green.", "C"),
    ("Option D", "D"),
    ("The best option is (c).", "C"),
    ("B. blue", "B"),
    ("(B) blue", "B"),
    ("D: dark red", "D"),
    ("B blue", "B"),
    ("blue", "B"),
    ("Blue.", "B"),
    ("dark red", "D"),  # not "red": the longer option contains it
    ("The square is dark red.", "D"),
    ("it's green", "C"),
    ("The answer is a green square", "C"),  # the article "a" is not option A
    ("I think B", "B"),
    ("Answer: Blue", "B"),  # "Blue" is the option text, not the letter B followed by "lue"
    ("It is red, not blue", None),  # two options: ambiguous
    ("E", None),  # no such option
    ("(F)", None),
    ("", None),
    ("   ", None),
    ("I am not sure.", None),
    ("¯\\_(ツ)_/¯", None),
    ("purple", None),
]


@pytest.mark.parametrize("output,expected", OUTPUTS)
def test_parse_choice(output, expected):
    parsed = parse_choice(output, CHOICES)
    assert (None if parsed is None else "ABCD"[parsed]) == expected


def test_parse_choice_with_numeric_and_lettered_options():
    counts = ["1", "2", "3", "4"]
    assert parse_choice("2", counts) == 1  # the option text "2", not an index
    assert parse_choice("There are 3 shapes.", counts) == 2
    assert parse_choice("C", counts) == 2
    assert parse_choice("2 or 3", counts) is None
    videomme = ["A. apples", "B. pears", "C. plums", "D. figs"]
    assert parse_choice("(B)", videomme) == 1
    assert parse_choice("plums", videomme) == 2
    assert parse_choice("The answer is D. figs", videomme) == 3


def test_prompt_lists_lettered_options_and_asks_for_the_letter():
    mc = Question("What color is the square?", "blue", ("red", "blue"))
    assert format_prompt(mc) == f"What color is the square?\n(A) red\n(B) blue\n{MC_INSTRUCTION}"
    assert format_prompt(Question("What happens?", "a dog runs")) == "What happens?"
    own = Question("Fruit?", "B", ("A. apples", "B. pears"))
    assert "(A) apples\n(B) pears" in format_prompt(own)
    assert option_texts(["A. x", "C. y"]) == ["A. x", "C. y"]  # letters out of order: kept as is


@pytest.mark.parametrize(
    "answer,expected",
    [("blue", 1), ("Blue.", 1), (" BLUE ", 1), ("B", 1), ("(b)", 1), ("B.", 1), ("d", 3), ("dark red", 3)],
)
def test_reference_answer_is_option_text_or_letter(answer, expected):
    assert correct_choice(Question("Q", answer, tuple(CHOICES)), "here") == expected


def test_reference_answer_prefers_option_text_over_letter():
    assert correct_choice(Question("Q", "B", ("B", "A")), "here") == 0
    assert correct_choice(Question("Q", "pears", ("A. apples", "B. pears")), "here") == 1
    assert correct_choice(Question("Q", "B", ("A. apples", "B. pears")), "here") == 1
    assert correct_choice(Question("Q", "anything"), "here") is None  # open-ended


@pytest.mark.parametrize("answer,message", [
    ("purple", r"entry 3 \(x\): answer 'purple' is not among the choices \['red', 'blue'"),
    ("E", "answer 'E' is not among the choices"),
    (None, "needs an 'answer'"),
    ("  ", "needs an 'answer'"),
])
def test_reference_answer_not_among_choices_is_an_error(answer, message):
    with pytest.raises(AnnotationError, match=message):
        correct_choice(Question("Q", answer, tuple(CHOICES)), "entry 3 (x)")


def test_benchmark_check_names_the_entry(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([
        {"video_id": "ok", "video_path": "a.mp4",
         "conversations": [{"question": "Colour?", "choices": ["red", "blue"], "answer": "blue"},
                           {"question": "Open?", "answer": "anything"}]},
        {"video_id": "bad", "video_path": "b.mp4",
         "conversations": [{"question": "Shape?", "choices": ["circle", "square"], "answer": "triangle"}]},
    ]))
    entries = load_annotations(path)
    assert check_benchmark(entries[:1]) == [[1, None]]
    with pytest.raises(AnnotationError, match=r"entry 1 \(video_id 'bad'\), question 'Shape\?': answer 'triangle'"):
        check_benchmark(entries)
    with pytest.raises(AnnotationError, match="video_id 'ok' appears in entries 0 and 1"):
        check_benchmark([entries[0], entries[0]])
    with pytest.raises(AnnotationError, match="no videos"):
        check_benchmark([])
