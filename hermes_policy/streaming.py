"""Drive a session over a whole input: frames in time order, each question at its time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .models.base import ModelAdapter
from .policy import ModelInfo, Policy, paper_default
from .retention import RULES, HermesRetention, RetentionRule, make_rule
from .session import Answer, StreamingSession


def rule_from_spec(spec: str, adapter: ModelAdapter, budget: int, **options: Any) -> RetentionRule:
    """A rule from a command-line spec: a policy file, ``paper-default``, or a rule name.

    ``options`` go to rules that have them (``frames`` of ``window``; ``retrieve_chunks``
    and ``host_budget_bytes`` of ``retrieval``); None values and options of other rules are
    ignored, so a command line can pass every option whatever the rule.
    """
    if spec == "paper-default":
        return HermesRetention(policy=paper_default(ModelInfo.of(adapter), budget=budget))
    if spec.endswith(".json") or Path(spec).is_file():
        return HermesRetention(policy=Policy.load(spec))
    fields = RULES[spec].__dataclass_fields__ if spec in RULES else {}
    return make_rule(spec, budget, **{k: v for k, v in options.items() if k in fields})


@dataclass
class TimedQuestion:
    """A question asked once the stream has passed ``at`` seconds (inf: at the end)."""

    question: str
    at: float = math.inf
    expected: str | None = None


def stream_with_questions(
    session: StreamingSession,
    frames: Any,
    timestamps: np.ndarray,
    questions: list[TimedQuestion],
    max_new_tokens: int | None = None,
) -> list[tuple[TimedQuestion, Answer]]:
    """Stream ``frames`` chunk by chunk and ask each question as soon as its time has come.

    A question at time ``t`` is asked after every frame with timestamp ``<= t`` has been
    ingested (a partial chunk is flushed first, as :meth:`StreamingSession.ask` does).
    """
    pending = sorted(questions, key=lambda q: q.at)
    results = []
    n = len(frames)
    index = 0
    while index < n:
        # ingest up to the next question's time, or everything
        limit = pending[0].at if pending else math.inf
        end = index
        while end < n and timestamps[end] <= limit:
            end += 1
        if end > index:
            session.add_frames(frames[index:end], timestamps=[float(t) for t in timestamps[index:end]])
            index = end
        while pending and (index >= n or timestamps[index] > pending[0].at):
            question = pending.pop(0)
            results.append((question, session.ask(question.question, max_new_tokens)))
        if not pending and index >= n:
            break
    for question in pending:  # questions after the end
        results.append((question, session.ask(question.question, max_new_tokens)))
    return results
