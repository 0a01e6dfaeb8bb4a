"""Evaluation judges on hand-made examples (the http judge is configured, never called)."""

from __future__ import annotations

import pytest

from hermes_policy.evaluation.judges import (
    ExactMatchJudge,
    HttpJudge,
    Judge,
    JudgeError,
    TokenF1Judge,
    Verdict,
    judge_messages,
    make_judge,
    parse_judge_reply,
    token_f1,
)


@pytest.mark.parametrize("reference,prediction,correct", [
    ("The red circle", "red circle", True),  # articles, case
    ("a dog", "A dog!", True),  # punctuation
    ("Paris", "paris.", True),
    ("red circle", "circle red", False),  # order matters for exact match
    ("red", "dark red", False),
    ("red", "", False),
])
def test_exact_match(reference, prediction, correct):
    verdict = ExactMatchJudge().judge("Q?", reference, prediction)
    assert verdict.correct is correct and verdict.score == float(correct)


def test_exact_match_may_allow_containment():
    judge = ExactMatchJudge(allow_contains=True)
    assert judge.judge("Q?", "red", "It is dark red.").correct
    assert not judge.judge("Q?", "red", "It is reddish.").correct


def test_token_f1_values():
    assert token_f1("the red circle", "red circle") == 1.0
    assert token_f1("a man opens the door", "the man closes the door") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_f1_judge_threshold():
    loose, strict = TokenF1Judge(0.5), TokenF1Judge(0.8)
    reference, prediction = "the man closes the door", "a man opens the door"
    assert loose.judge("Q?", reference, prediction).correct
    assert not strict.judge("Q?", reference, prediction).correct
    assert loose.judge("Q?", reference, prediction).score == pytest.approx(2 / 3)
    with pytest.raises(JudgeError, match="threshold"):
        TokenF1Judge(0.0)


def test_make_judge_and_protocol(monkeypatch):
    assert make_judge("exact").name == "exact"
    assert make_judge("f1", f1_threshold=0.7).threshold == 0.7
    with pytest.raises(JudgeError, match="unknown judge 'gpt'"):
        make_judge("gpt")
    monkeypatch.delenv("HERMES_JUDGE_URL", raising=False)
    monkeypatch.delenv("HERMES_JUDGE_MODEL", raising=False)
    with pytest.raises(JudgeError, match="--judge-url and --judge-model"):
        make_judge("http")
    with pytest.raises(JudgeError, match="http"):
        make_judge("http", url="ftp://x", model="m")
    monkeypatch.setenv("HERMES_JUDGE_URL", "http://localhost:8000/v1/")
    monkeypatch.setenv("HERMES_JUDGE_MODEL", "judge-model")
    judge = make_judge("http", api_key_env="MY_KEY")
    assert isinstance(judge, HttpJudge) and judge.endpoint == "http://localhost:8000/v1/chat/completions"
    assert judge.api_key_env == "MY_KEY" and "MY_KEY" in repr(judge)

    class Contains:  # any object with a name and judge() is a judge
        name = "contains"

        def judge(self, question: str, reference: str, prediction: str) -> Verdict:
            return Verdict(reference in prediction, 1.0)

    assert isinstance(Contains(), Judge) and isinstance(ExactMatchJudge(), Judge)


def test_http_judge_messages_and_replies():
    messages = judge_messages("What runs?", "a dog", "the dog")
    assert messages[0]["role"] == "system" and "Correct answer: a dog" in messages[1]["content"]
    assert parse_judge_reply('{"correct": true, "score": 4}') == Verdict(True, 0.8, '{"correct": true, "score": 4}')
    assert not parse_judge_reply('Sure. {"correct": "no", "score": 1}').correct
    assert parse_judge_reply("Yes, it matches.").correct
    assert not parse_judge_reply("No.").correct
    with pytest.raises(JudgeError, match="cannot be read"):
        parse_judge_reply("maybe")
