"""Video-QA benchmarks on the streaming runtime: prompts, answer parsing, judges, the
resumable runner, its summary, and scale-out over processes/GPUs with torch.distributed.

``hermes-probe eval`` is the command-line front end (``cli/eval_command.py``).
"""

from hermes_policy.evaluation.answers import correct_choice, parse_choice
from hermes_policy.evaluation.judges import (
    ExactMatchJudge,
    HttpJudge,
    Judge,
    JudgeError,
    TokenF1Judge,
    Verdict,
    make_judge,
)
from hermes_policy.evaluation.prompts import format_prompt
from hermes_policy.evaluation.runner import EvalError, EvalResult, evaluate
from hermes_policy.evaluation.summary import duration_class

__all__ = [
    "EvalError",
    "EvalResult",
    "ExactMatchJudge",
    "HttpJudge",
    "Judge",
    "JudgeError",
    "TokenF1Judge",
    "Verdict",
    "correct_choice",
    "duration_class",
    "evaluate",
    "format_prompt",
    "make_judge",
    "parse_choice",
]
