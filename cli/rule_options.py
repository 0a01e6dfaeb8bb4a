"""Command-line options of the retention rules, shared by ``stream`` and ``eval``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

Budget = Annotated[
    int | None, typer.Option(min=1, help="Stream tokens per layer: for rules and paper-default (default 4000); "
                             "with a policy.json it overrides the file's budgets.")
]
WindowFrames = Annotated[
    int | None, typer.Option(min=1, help="--policy window: frames re-prefilled at each question [default: 4].")
]
RetrieveChunks = Annotated[
    int | None, typer.Option(min=0, help="--policy retrieval: chunks brought back per layer [default: 4].")
]
HostBudgetGb = Annotated[
    float | None, typer.Option(min=0.001, help="--policy retrieval: host memory for offloaded chunks [default: 32].")
]


def rule_options(window_frames: int | None, retrieve_chunks: int | None, host_budget_gb: float | None) -> dict[str, Any]:
    """The options as :func:`~hermes_policy.inputs.playback.rule_from_spec` takes them (None: the rule's default)."""
    return {
        "frames": window_frames,
        "retrieve_chunks": retrieve_chunks,
        "host_budget_bytes": None if host_budget_gb is None else int(host_budget_gb * 2**30),
    }
