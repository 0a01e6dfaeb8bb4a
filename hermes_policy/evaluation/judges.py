"""Judges: score an open-ended prediction against a reference answer.

Multiple-choice questions are scored by :func:`~hermes_policy.evaluation.answers.parse_choice`,
never by a judge. A judge is anything with a ``name`` and a
``judge(question, reference, prediction) -> Verdict`` method (:class:`Judge`).

Built in, all local, none needs a network:

* ``exact``: the normalised prediction equals the normalised reference (lower case,
  punctuation, the articles a/an/the and extra spaces removed), or, with
  ``allow_contains``, contains it as whole words;
* ``f1``: token-level F1 between the normalised prediction and reference (SQuAD-style bag of
  words); correct when ``F1 >= threshold`` (0.5 by default);
* ``http``: an optional LLM judge behind any OpenAI-compatible ``/chat/completions``
  endpoint, using only the standard library (:mod:`urllib`). It is configured by URL,
  model name and the *name* of the environment variable holding the API key (the key itself
  never appears on a command line or in a results file). It is never needed and never run by
  the tests.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from hermes_policy import options
from hermes_policy.errors import HermesError
from hermes_policy.evaluation.answers import normalize_text

JUDGE_NAMES = ("exact", "f1", "http")


class JudgeError(HermesError):
    """A judge is misconfigured or its service failed."""


@dataclass(frozen=True)
class Verdict:
    """A judge's decision: ``correct``, a ``score`` in [0, 1], and a short ``detail``."""

    correct: bool
    score: float
    detail: str = ""


@runtime_checkable
class Judge(Protocol):
    """Scores an open-ended prediction; ``name`` is recorded with every result."""

    name: str

    def judge(self, question: str, reference: str, prediction: str) -> Verdict: ...


_ARTICLES = {"a", "an", "the"}


def answer_tokens(text: str) -> list[str]:
    """Words of a normalised answer, without articles."""
    return [w for w in normalize_text(text).split() if w not in _ARTICLES]


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two answers (1.0 when both are empty)."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass
class ExactMatchJudge:
    """Correct when the normalised answers are equal (or, optionally, one contains the other)."""

    allow_contains: bool = False
    name: str = "exact"

    def judge(self, question: str, reference: str, prediction: str) -> Verdict:
        pred, ref = " ".join(answer_tokens(prediction)), " ".join(answer_tokens(reference))
        correct = bool(ref) and (pred == ref or (self.allow_contains and f" {ref} " in f" {pred} "))
        return Verdict(correct, float(correct))


@dataclass
class TokenF1Judge:
    """Correct when the token F1 reaches ``threshold``; the score is the F1 itself."""

    threshold: float = 0.5
    name: str = "f1"

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise JudgeError(f"the F1 threshold must be in (0, 1], got {self.threshold}")

    def judge(self, question: str, reference: str, prediction: str) -> Verdict:
        f1 = token_f1(prediction, reference)
        return Verdict(f1 >= self.threshold, f1, f"f1={f1:.3f}")


JUDGE_SYSTEM_PROMPT = (
    "You evaluate answers to questions about videos. Compare the predicted answer with the "
    "correct answer and decide whether the prediction is correct: it must match the meaning "
    "of the correct answer; synonyms and paraphrases are fine. Reply with JSON only, in the "
    'form {"correct": true or false, "score": an integer from 0 to 5}.'
)


def judge_messages(question: str, reference: str, prediction: str) -> list[dict[str, str]]:
    """The chat messages sent to an LLM judge."""
    user = f"Question: {question}\nCorrect answer: {reference}\nPredicted answer: {prediction}"
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_judge_reply(content: str) -> Verdict:
    """Read an LLM judge's reply: the JSON asked for, or failing that a leading yes/no."""
    match = re.search(r"\{.*\}", content, re.S)
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("correct"), (bool, str)):
            correct = data["correct"]
            if isinstance(correct, str):
                correct = correct.strip().lower() in ("true", "yes")
            score = data.get("score")
            value = min(max(float(score), 0.0), 5.0) / 5.0 if isinstance(score, (int, float)) else float(correct)
            return Verdict(bool(correct), value, content.strip()[:200])
    word = normalize_text(content).split()[:1]
    if word and word[0] in ("yes", "correct", "true"):
        return Verdict(True, 1.0, content.strip()[:200])
    if word and word[0] in ("no", "incorrect", "false", "wrong"):
        return Verdict(False, 0.0, content.strip()[:200])
    raise JudgeError(f"the judge's reply cannot be read: {content.strip()[:200]!r}")


@dataclass
class HttpJudge:
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint.

    Parameters
    ----------
    url : the API base (``https://host/v1``) or the full ``.../chat/completions`` URL
    model : the judge model's name at that endpoint
    api_key_env : name of the environment variable holding the API key (may be unset for
        local servers that need none)
    timeout : seconds per request
    retries : further attempts after a failed request (exponential back-off)
    """

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    retries: int = 3
    name: str = "http"

    def __post_init__(self) -> None:
        if not self.url or not re.match(r"^https?://", self.url):
            raise JudgeError(f"the http judge needs an http(s) URL, got {self.url!r}")
        if not self.model:
            raise JudgeError("the http judge needs a model name")

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else f"{url}/chat/completions"

    def _request(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        key = options.variable(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
            return json.loads(response.read().decode("utf-8"))

    def judge(self, question: str, reference: str, prediction: str) -> Verdict:
        body = json.dumps({
            "model": self.model,
            "messages": judge_messages(question, reference, prediction),
            "temperature": 0,
            "max_tokens": 64,
        }).encode("utf-8")
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                reply = self._request(body)
                return parse_judge_reply(reply["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:
                error = exc
                if exc.code in (400, 401, 403, 404):  # will not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, TypeError,
                    json.JSONDecodeError) as exc:
                error = exc
            if attempt < self.retries:
                time.sleep(2.0**attempt)
        raise JudgeError(f"the http judge at {self.endpoint} failed: {error}")


def make_judge(
    name: str,
    *,
    f1_threshold: float = 0.5,
    url: str | None = None,
    model: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
) -> Judge:
    """A judge by name: ``exact``, ``f1`` or ``http``.

    For ``http`` the URL and model default to the environment variables
    ``HERMES_JUDGE_URL`` and ``HERMES_JUDGE_MODEL``.
    """
    if name == "exact":
        return ExactMatchJudge()
    if name == "f1":
        return TokenF1Judge(threshold=f1_threshold)
    if name == "http":
        default_url, default_model = options.judge_endpoint()
        url, model = url or default_url, model or default_model
        if not url or not model:
            raise JudgeError(f"the http judge needs --judge-url and --judge-model (or {options.JUDGE_ENDPOINT_VARIABLES})")
        return HttpJudge(url=url, model=model, api_key_env=api_key_env)
    raise JudgeError(f"unknown judge {name!r}; choose one of {', '.join(JUDGE_NAMES)}")
