"""Calibration on the runtime: coordinate descent on KL(full || policy) over depth groups.

Attention recall (:mod:`hermes_probe.calibrate`) values each token by the attention later
questions put on it, one token at a time. On the embedded SmolLM2 it prefers scattered
attention peaks, while the real runtime does better with a contiguous recent window
(docs/fidelity.md): recall cannot see what a fragmented cache does to the model. This
module therefore tunes the policy on the quantity that matters, the KL of the answer
distributions to the full cache's, measured by streaming a calibration stream through the
real runtime.

The search starts from pure recency with an even budget split (the same keep sets as fifo)
and accepts a move only where the runtime says it helps by more than ``margin``
(relative), so its result is never worse than fifo on the calibration stream and differs
from it only where a measured gain justifies it. Moves, in order, each tried per group of
contiguous layers:

1. the budget split chosen by recall (all layers at once);
2. a lower recency weight ``w`` (the group's layers keep their recall-chosen
   pseudo-query and forgetting rate);
3. for groups with ``w < 1``: another forgetting rate ``k``;
4. a summary token (folds what a layer evicts into one slot);
5. for policies with some ``w < 1``: the recall-chosen smoothing scale.

Every candidate is scored at each budget share and the weighted KLs averaged; copy probes
and memory probes (kv, facts) weigh one half each, as in the recall objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hermes_policy.inputs.fidelity_tasks import FidelityStream
from hermes_policy.models.base import ModelAdapter
from hermes_policy.policy import LayerPolicy, Policy


@dataclass(frozen=True)
class SearchSpace:
    """What the runtime search may change.

    Parameters
    ----------
    groups : number of contiguous depth groups moved together
    recency_weights : recency weights tried for a group below 1
    forgetting_rates : forgetting rates tried for a group with ``w < 1``
    summary : whether summary tokens are tried
    margin : relative KL decrease a move must bring to be kept
    """

    groups: int = 5
    recency_weights: tuple[float, ...] = (0.8, 0.5, 0.2)
    forgetting_rates: tuple[float, ...] = (2.0, 8.0, 30.0)
    summary: bool = True
    margin: float = 0.005

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "recency_weights": list(self.recency_weights),
                "forgetting_rates": list(self.forgetting_rates), "summary": self.summary, "margin": self.margin}


@dataclass(frozen=True)
class SearchPoint:
    """Per-layer settings of one candidate policy (lists of length ``layers``)."""

    prompt: tuple[str, ...]
    recency_weight: tuple[float, ...]
    forgetting_rate: tuple[float, ...]
    budget_multiple: tuple[float, ...]
    summary_token: tuple[bool, ...]
    smoothing: float = 0.0

    def with_layers(self, layers: Sequence[int], **values: Any) -> SearchPoint:
        """This point with ``values`` (``recency_weight=0.5``, ...) set on ``layers``."""
        changed = {}
        for name, value in values.items():
            current = list(getattr(self, name))
            for i in layers:
                current[i] = value
            changed[name] = tuple(current)
        return replace(self, **changed)

    def policy(self, base: Policy, provenance: dict[str, Any] | None = None) -> Policy:
        """``base`` (model, total budget, guidance) with these per-layer settings.

        A layer's tier label follows its settings, as the runtime picks the pseudo-query by
        it: ``w = 1`` -> sensory, global prompt -> long_term, otherwise working.
        """
        n = len(base.layers)
        total = float(sum(self.budget_multiple))
        budgets = [max(base.model.tokens_per_frame, int(base.budget * m * n / total)) for m in self.budget_multiple]
        layers = []
        for i in range(n):
            w = self.recency_weight[i]
            tier = "sensory" if w >= 1.0 else ("long_term" if self.prompt[i] == "global" else "working")
            layers.append(LayerPolicy(index=i, tier=tier, recency_weight=float(w),
                                      forgetting_rate=float(self.forgetting_rate[i]),
                                      smoothing=round(float(self.smoothing), 4), budget=budgets[i],
                                      summary_token=bool(self.summary_token[i])))
        prov = dict(base.provenance)
        if provenance is not None:
            prov.update(provenance)
        return Policy(base.model, base.budget, dict(base.tiers), layers, base.guidance, base.reindex, prov)

    def describe(self) -> dict[str, Any]:
        return {"prompt": list(self.prompt), "recency_weight": list(self.recency_weight),
                "forgetting_rate": list(self.forgetting_rate), "budget_multiple": list(self.budget_multiple),
                "summary_token": list(self.summary_token), "smoothing": self.smoothing}


def depth_groups(layers: int, groups: int) -> list[list[int]]:
    """``layers`` split into ``min(groups, layers)`` contiguous groups of near-equal size."""
    groups = max(1, min(groups, layers))
    edges = np.linspace(0, layers, groups + 1).round().astype(int)
    return [list(range(int(a), int(b))) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def recency_start(prompt: Sequence[str], forgetting_rate: Sequence[float]) -> SearchPoint:
    """Pure recency with an even split (fifo's keep sets), carrying the recall-chosen
    pseudo-queries and forgetting rates for the layers a move turns to attention."""
    n = len(prompt)
    return SearchPoint(tuple(prompt), (1.0,) * n, tuple(float(k) for k in forgetting_rate), (1.0,) * n,
                       (False,) * n, 0.0)


@dataclass
class SearchResult:
    """The chosen point, its objective, and every candidate tried (in order)."""

    point: SearchPoint
    value: float
    start_value: float
    history: list[dict[str, Any]] = field(default_factory=list)


def coordinate_search(
    objective: Callable[[SearchPoint], float],
    start: SearchPoint,
    space: SearchSpace,
    recall_split: Sequence[float] | None = None,
    recall_smoothing: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Minimise ``objective`` from ``start`` by the moves in the module docstring.

    ``objective`` is evaluated once per distinct point (memoised). A move is kept when it
    lowers the current value by more than ``space.margin`` times that value.
    """
    cache: dict[SearchPoint, dict[str, Any]] = {}  # frozen, so a point is its own key
    history: list[dict[str, Any]] = []

    def evaluate(point: SearchPoint, move: str) -> dict[str, Any]:
        if point not in cache:
            if progress:
                progress(f"runtime search: {move}")
            cache[point] = {"move": move, "kl": float(objective(point)), "kept": False}
            history.append(cache[point])
        return cache[point]

    best = start
    first = evaluate(start, "start (pure recency, even split)")
    first["kept"] = True
    best_value = start_value = first["kl"]

    def consider(candidate: SearchPoint, move: str) -> None:
        nonlocal best, best_value
        entry = evaluate(candidate, move)
        if entry["kl"] < best_value * (1.0 - space.margin):
            entry["kept"] = True
            best, best_value = candidate, entry["kl"]

    groups = depth_groups(len(start.prompt), space.groups)
    if recall_split is not None and tuple(recall_split) != best.budget_multiple:
        consider(replace(best, budget_multiple=tuple(float(m) for m in recall_split)), "recall budget split")
    for layers in groups:
        span = f"layers {layers[0]}-{layers[-1]}"
        incumbent = best
        for w in space.recency_weights:
            consider(incumbent.with_layers(layers, recency_weight=float(w)), f"{span}: w={w:g}")
    for layers in groups:
        if best.recency_weight[layers[0]] >= 1.0:
            continue
        span = f"layers {layers[0]}-{layers[-1]}"
        incumbent = best
        for k in space.forgetting_rates:
            consider(incumbent.with_layers(layers, forgetting_rate=float(k)), f"{span}: k={k:g}")
    if space.summary:
        for layers in groups:
            consider(best.with_layers(layers, summary_token=True), f"layers {layers[0]}-{layers[-1]}: summary token")
    if recall_smoothing > 0 and min(best.recency_weight) < 1.0:
        consider(replace(best, smoothing=float(recall_smoothing)), f"smoothing {recall_smoothing:g}")
    return SearchResult(best, best_value, start_value, history)


class RuntimeKL:
    """``KL(full || policy)`` on one stream, run through the real runtime.

    The full cache is streamed once; each call streams the stream under the policy at
    every budget share (the policy's per-layer budgets rescaled to ``share x stream``) and
    returns the mean over shares of the task-weighted mean KL at the probes' answer positions.
    """

    def __init__(self, adapter: ModelAdapter, base: Policy, stream: FidelityStream, budget_shares: Sequence[float],
                 chunk_frames: int = 8) -> None:
        from hermes_policy.retention import FullRetention

        from .calibrate import task_weights
        from .fidelity import score_probes, stream_session

        self.adapter, self.base, self.stream = adapter, base, stream
        self.budget_shares = [float(s) for s in budget_shares]
        self.chunk_frames = chunk_frames
        self.weights = task_weights([p.task for p in stream.probes])
        self.reference = score_probes(stream_session(adapter, FullRetention(), stream, chunk_frames), stream.probes)
        self.length = len(stream.frames) * adapter.tokens_per_frame

    def of_rule(self, make: Callable[[int], Any]) -> float:
        """The objective of any retention rule, ``make(budget) -> rule``."""
        from .fidelity import kl_rows, score_probes, stream_session

        values = []
        for share in self.budget_shares:
            rule = make(int(round(share * self.length)))
            scores = score_probes(stream_session(self.adapter, rule, self.stream, self.chunk_frames), self.stream.probes)
            kl = np.array([kl_rows(r.logprobs, s.logprobs) for r, s in zip(self.reference, scores, strict=True)])
            values.append(float((kl * self.weights).sum()))
        return float(np.mean(values))

    def of_policy(self, policy: Policy) -> float:
        from hermes_policy.retention import HermesRetention

        from .fidelity import rescaled_policy

        return self.of_rule(lambda budget: HermesRetention(policy=rescaled_policy(policy, budget)))

    def __call__(self, point: SearchPoint) -> float:
        return self.of_policy(point.policy(self.base))
