"""Calibrated policies: per-layer parameters and budgets chosen by attention recall.

On calibration streams (the fidelity streams of other seeds than those evaluated), the
full cache is streamed once; after every chunk the two HERMES pseudo-queries (global and
mixed prompt) are run and their per-layer attention recorded, and after the last frame the
probes' own attention at their answer positions is recorded per layer and head
(:func:`record_stream`). From these alone, without the model:

1. per layer, a grid over the recency weight ``w`` (0 to 1), the forgetting rate ``k``
   (0.5 to 30, paper-like 8-20 included) and the pseudo-query (global or mixed) is
   replayed through the rule's compression steps (:func:`~hermes_probe.recall.simulate_keep`)
   and scored by attention recall, averaged over the budgets asked for;
2. the objective weighs recency needs and memory needs equally: the mean recall of the
   ``copy`` probes (recent spans) and of the memory probes (``kv`` and ``facts``) count
   one half each, whatever their numbers;
3. the split of the total budget across layers maximises the summed recall (a small
   dynamic programme over budget levels 0.5x to 2x the even share);
4. one smoothing scale for all layers is chosen by replaying the whole policy
   (:func:`~hermes_probe.recall.simulate_policy`).

Summary tokens are not valued by attention recall (the summary is a new token no question
attended to); recall leaves them off.

5. with a KL stream (the default of ``analyze --calibrate``), the recall choices become the
   moves of a search on the real runtime (:mod:`hermes_probe.runtime_search`): from pure
   recency with an even split, a depth group takes the recall-chosen split, a lower
   recency weight, another forgetting rate or a summary token only where KL(full || policy)
   on a calibration stream falls; the held-out KL of the baselines and policies is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from hermes_policy.attention.capture import AttentionCapture
from hermes_policy.inputs.fidelity_tasks import FidelityStream
from hermes_policy.models.base import ModelAdapter
from hermes_policy.policy import Guidance, Policy
from hermes_policy.retention import FullRetention, GuidanceRequest
from hermes_policy.session import StreamingSession

from .fidelity import prompt_ids
from .recall import oracle_recall, recall, simulate_keep, simulate_policy
from .runtime_search import SearchPoint, SearchSpace

W_GRID: tuple[float, ...] = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 11))
K_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 20.0, 30.0)
BUDGET_LEVELS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
SMOOTHING_SCALES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)
PROMPTS: tuple[str, ...] = ("global", "mixed")
MEMORY_TASKS: tuple[str, ...] = ("kv", "facts")


@dataclass
class StreamRecord:
    """What calibration needs from one stream, recorded on the full cache.

    guidance : per prompt name, per chunk ``t``, attention ``(layers, n_t)`` over the stream
    questions : probes' attention at their answer positions, ``(probes, layers, heads, T)``
        float32, each row summing to 1 over the stream tokens
    tasks : task of each probe
    seed, frames : the stream's seed and length
    weighted : per probe and layer, the attention weighted by each token's value-output
        norm ``||W_O,h v_i||`` and summed over heads, ``(probes, layers, T)`` summing to 1
        over the stream: the share of the layer's attention *output* each token makes
        (tokens that take attention but write little, such as attention sinks, count less)
    """

    guidance: dict[str, list[np.ndarray]]
    questions: np.ndarray
    tasks: list[str]
    seed: int
    frames: int
    weighted: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.questions.shape[-1])

    def layer_steps(self, prompt: str, layer: int) -> list[np.ndarray]:
        return [step[layer] for step in self.guidance[prompt]]

    def target(self, layer: int, objective: str = "attention") -> np.ndarray:
        """What recall is measured on at ``layer``, ``(probes, T)``: the head-mean attention
        (``attention``) or the value-weighted attention (``value``)."""
        if objective == "value":
            if self.weighted is None:
                raise ValueError("this record holds no value-weighted attention")
            return self.weighted[:, layer]
        if objective != "attention":
            raise ValueError(f"unknown objective {objective!r}")
        return self.questions[:, layer].mean(1)


OBJECTIVES: tuple[str, ...] = ("attention", "value")


def value_output_norms(adapter: ModelAdapter, session: StreamingSession) -> np.ndarray:
    """``||W_O,h v_i||`` of every stream token ``i`` at every layer and query head ``h``:
    ``(layers, heads, T)``. The norm of what head ``h`` writes per unit of attention on ``i``."""
    store = session.store
    prefix, heads = store.prefix_len, adapter.num_heads
    out = []
    with torch.inference_mode():
        for layer, module in enumerate(adapter.attention_modules):
            values = store.layer(layer).values[0, :, prefix:].float()  # (kv_heads, T, d)
            kv_heads, _, dim = values.shape
            weight = module.o_proj.weight.float()  # (hidden, heads * d)
            rows = []
            for h in range(heads):
                w_h = weight[:, h * dim : (h + 1) * dim]
                rows.append((values[h // (heads // kv_heads)] @ w_h.T).norm(dim=-1))
            out.append(torch.stack(rows).cpu().numpy())
    return np.stack(out)


def record_stream(adapter: ModelAdapter, stream: FidelityStream, chunk_frames: int = 8,
                  guidance: Guidance | None = None, batch: int = 12) -> StreamRecord:
    """Stream ``stream`` on the full cache, recording pseudo-query and question attention."""
    g = guidance or Guidance()
    prompts = {"global": g.global_, "mixed": f"{g.local}; {g.global_}"}
    session = StreamingSession(adapter, FullRetention(), chunk_frames=chunk_frames)
    layers = adapter.num_layers
    steps: dict[str, list[np.ndarray]] = {name: [] for name in prompts}
    for start in range(0, len(stream.frames), chunk_frames):
        session.add_frames(stream.frames[start : start + chunk_frames])
        session.flush()
        for name, text in prompts.items():
            with torch.inference_mode():
                attention = session.guidance_attention(GuidanceRequest((text,), (0,) * layers))
            steps[name].append(np.stack([a.float().cpu().numpy() for a in attention]).astype(np.float32))
    prefix = session.store.prefix_len
    length = session.store.stream_lengths()[0]
    norms = value_output_norms(adapter, session)  # (L, H, T)
    probes = stream.probes
    out = np.zeros((len(probes), layers, adapter.num_heads, length), dtype=np.float32)
    for first in range(0, len(probes), batch):
        group = probes[first : first + batch]
        items = [(prompt_ids(adapter, p), p.answer_ids) for p in group]
        spans, offset = [], 0
        for prompt, answer in items:
            block = len(prompt) + len(answer) - 1
            spans.append((offset + len(prompt) - 1, offset + block))
            offset += block

        def take(layer: int, probs: torch.Tensor, spans: list[tuple[int, int]] = spans, first: int = first) -> None:
            stream_part = probs[0, :, :, prefix : prefix + length].double()  # (H, rows, T)
            stream_part = stream_part / stream_part.sum(-1, keepdim=True).clamp_min(1e-300)
            for j, (a, b) in enumerate(spans):
                out[first + j, layer] = stream_part[:, a:b].mean(1).float().cpu().numpy()

        capture = AttentionCapture(adapter.attention_modules, callback=take)
        session.batch_continuation_logprobs(items, capture=capture)
    weighted = (out * norms[None]).sum(2)
    weighted /= np.maximum(weighted.sum(-1, keepdims=True), 1e-30)
    return StreamRecord(steps, out, [p.task for p in probes], stream.seed, len(stream.frames),
                        weighted.astype(np.float32))


def task_weights(tasks: Sequence[str]) -> np.ndarray:
    """Per-probe weights ``(probes,)`` summing to 1: copy probes share one half, memory
    probes (kv, facts) the other (all of it when one kind is absent)."""
    tasks = list(tasks)
    copy = np.array([t == "copy" for t in tasks])
    memory = np.array([t in MEMORY_TASKS for t in tasks])
    w = np.zeros(len(tasks))
    kinds = [m for m in (copy, memory) if m.any()]
    for mask in kinds:
        w[mask] = 1.0 / (len(kinds) * mask.sum())
    return w


def layer_recall(record: StreamRecord, layer: int, kept: np.ndarray, weights: np.ndarray | None = None,
                 objective: str = "attention") -> float:
    """Weighted mean over probes of the recall at ``layer`` of ``kept`` (see :meth:`StreamRecord.target`)."""
    w = task_weights(record.tasks) if weights is None else weights
    return float((recall(record.target(layer, objective), kept) * w).sum())


def grid_recall(records: Sequence[StreamRecord], layer: int, budget_share: float,
                objective: str = "attention") -> np.ndarray:
    """Objective of every (prompt, w, k) at ``layer``: ``(prompts, |W|, |K|)``, averaged over
    records, at a budget of ``budget_share`` of each stream's length."""
    out = np.zeros((len(PROMPTS), len(W_GRID), len(K_GRID)))
    for record in records:
        budget = max(1, int(round(budget_share * record.length)))
        weights = task_weights(record.tasks)
        a = record.target(layer, objective)
        fifo_value = None
        for p, prompt in enumerate(PROMPTS):
            steps = record.layer_steps(prompt, layer)
            for i, w in enumerate(W_GRID):
                if w >= 1.0:  # pure recency: neither the prompt nor k matters
                    if fifo_value is None:
                        kept = simulate_keep(steps, budget, recency_weight=1.0)
                        fifo_value = float((recall(a, kept) * weights).sum())
                    out[p, i, :] += fifo_value
                    continue
                for j, k in enumerate(K_GRID):
                    kept = simulate_keep(steps, budget, recency_weight=w, forgetting_rate=k)
                    out[p, i, j] += float((recall(a, kept) * weights).sum())
    return out / len(records)


def split_by_recall(curves: np.ndarray, levels: Sequence[float], layers_total: float) -> list[float]:
    """Choose a budget level per layer maximising the summed recall at a fixed total.

    Parameters
    ----------
    curves : ``(layers, len(levels))`` recall of each layer at each level
    levels : budget multiples of the even share (e.g. 0.5 ... 2.0)
    layers_total : the total in units of the even share (the number of layers)

    Returns
    -------
    per layer, the chosen multiple (their sum is at most ``layers_total``, and equal to it
    when the levels allow)
    """
    unit = 0.25
    cost = [int(round(level / unit)) for level in levels]
    capacity = int(round(layers_total / unit))
    n = curves.shape[0]
    best = np.full((n + 1, capacity + 1), -np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((n + 1, capacity + 1), dtype=int)
    for layer in range(n):
        for used in range(capacity + 1):
            if not np.isfinite(best[layer, used]):
                continue
            for li, c in enumerate(cost):
                if used + c <= capacity and best[layer, used] + curves[layer, li] > best[layer + 1, used + c]:
                    best[layer + 1, used + c] = best[layer, used] + curves[layer, li]
                    choice[layer + 1, used + c] = li
    used = int(np.argmax(best[n]))
    picked = []
    for layer in range(n, 0, -1):
        li = choice[layer, used]
        picked.append(levels[li])
        used -= cost[li]
    return picked[::-1]


@dataclass
class Calibration:
    """The calibrator's choices and their objective values."""

    prompt: list[str]
    recency_weight: list[float]
    forgetting_rate: list[float]
    budget_multiple: list[float]
    smoothing_scale: float
    objective: dict[str, Any] = field(default_factory=dict)


def calibrate(records: Sequence[StreamRecord], budget_shares: Sequence[float], split: bool = True,
              objective: str = "attention") -> Calibration:
    """Per-layer (prompt, w, k), the budget split and a smoothing scale from ``records``.

    ``budget_shares``: budgets as shares of each stream's length (e.g. 1/8 and 1/4); the
    per-layer grid is averaged over them, the split uses their mean.
    """
    layers = records[0].questions.shape[1]
    prompt, ws, ks = [], [], []
    for layer in range(layers):
        grid = np.mean([grid_recall(records, layer, share, objective) for share in budget_shares], axis=0)
        p, i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
        prompt.append(PROMPTS[p])
        ws.append(W_GRID[i])
        ks.append(K_GRID[j])
    multiples = [1.0] * layers
    if split:
        share = float(np.mean(budget_shares))
        curves = np.zeros((layers, len(BUDGET_LEVELS)))
        for layer in range(layers):
            for li, level in enumerate(BUDGET_LEVELS):
                for record in records:
                    budget = max(1, int(round(share * level * record.length)))
                    kept = simulate_keep(record.layer_steps(prompt[layer], layer), budget,
                                         recency_weight=ws[layer], forgetting_rate=ks[layer])
                    curves[layer, li] += layer_recall(record, layer, kept, objective=objective) / len(records)
        multiples = split_by_recall(curves, BUDGET_LEVELS, layers)
    best_scale, best_value = 0.0, -np.inf
    values = {}
    for scale in SMOOTHING_SCALES:
        value = policy_recall(records, prompt, ws, ks, multiples, [scale] * layers, budget_shares, objective)
        values[scale] = value
        if value > best_value:
            best_scale, best_value = scale, value
    return Calibration(prompt, ws, ks, multiples, best_scale,
                       {"recall": best_value, "recall_by_smoothing_scale": values})


def policy_recall(records: Sequence[StreamRecord], prompt: Sequence[str], ws: Sequence[float], ks: Sequence[float],
                  multiples: Sequence[float], smoothing: Sequence[float], budget_shares: Sequence[float],
                  objective: str = "attention") -> float:
    """Mean over records, budgets and layers of the weighted recall of a whole policy."""
    values = []
    total = float(sum(multiples))
    layers = len(ws)
    for record in records:
        for share in budget_shares:
            budgets = [max(1, int(share * record.length * m * layers / total)) for m in multiples]
            steps = [record.layer_steps(prompt[layer], layer) for layer in range(layers)]
            kept = simulate_policy(steps, budgets, ws, ks, smoothing)
            values.append(np.mean([layer_recall(record, layer, kept[layer], objective=objective)
                                   for layer in range(layers)]))
    return float(np.mean(values))


def rule_recall(record: StreamRecord, rule: str, budget: int, policy: Policy | None = None,
                objective: str = "attention") -> np.ndarray:
    """Per-layer weighted recall ``(layers,)`` of a rule (or a HERMES policy) at ``budget``."""
    layers = record.questions.shape[1]
    if rule == "oracle":
        a = np.stack([record.target(i, objective) for i in range(layers)], axis=1)  # (P, L, T)
        w = task_weights(record.tasks)
        return (oracle_recall(a, budget) * w[:, None]).sum(0)
    if rule == "hermes":
        assert policy is not None
        prompt = ["global" if e.tier == "long_term" else "mixed" for e in policy.layers]
        total = sum(e.budget for e in policy.layers)
        budgets = [max(1, int(budget * layers * e.budget / total)) for e in policy.layers]
        kept = simulate_policy([record.layer_steps(prompt[i], i) for i in range(layers)], budgets,
                               [e.recency_weight for e in policy.layers], [e.forgetting_rate for e in policy.layers],
                               [e.smoothing for e in policy.layers])
    else:
        kept = [simulate_keep(record.layer_steps("global", i), budget, rule=rule) for i in range(layers)]
    return np.array([layer_recall(record, i, kept[i], objective=objective) for i in range(layers)])


def calibrated_policy(base: Policy, result: Calibration | SearchPoint, provenance: dict[str, Any]) -> Policy:
    """``base`` (for the model, tiers ranges, guidance) with the calibrated per-layer entries
    (a :class:`Calibration` has one smoothing ``lambda`` for every layer and no summary tokens).

    A layer's tier label follows its choices (the runtime picks the pseudo-query by it):
    ``w = 1`` -> sensory, global prompt -> long_term, otherwise working.
    """
    point = result if isinstance(result, SearchPoint) else search_point(result)
    return point.policy(base, {"source": "calibrated",
                               "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "calibration": provenance})


def search_point(result: Calibration) -> SearchPoint:
    """The recall calibration as a point of the runtime search."""
    n = len(result.prompt)
    return SearchPoint(tuple(result.prompt), tuple(float(w) for w in result.recency_weight),
                       tuple(float(k) for k in result.forgetting_rate), tuple(float(m) for m in result.budget_multiple),
                       (False,) * n, float(result.smoothing_scale))


RECALL_RULES: tuple[str, ...] = ("fifo", "sink-recent", "attention-only")


def recall_table(records: Sequence[StreamRecord], budget_shares: Sequence[float],
                 policies: dict[str, Policy], objective: str = "attention") -> dict[str, Any]:
    """Per budget share, per entrant (rules, ``hermes (NAME)`` policies, oracle): the mean
    over records of the per-layer weighted recall, and its mean over layers."""
    out: dict[str, Any] = {}
    for share in budget_shares:
        entry: dict[str, Any] = {}
        names = [*RECALL_RULES, *[f"hermes ({n})" for n in policies], "oracle"]
        for name in names:
            per_layer = []
            for record in records:
                budget = max(1, int(round(share * record.length)))
                if name.startswith("hermes ("):
                    per_layer.append(rule_recall(record, "hermes", budget, policies[name[8:-1]], objective))
                else:
                    per_layer.append(rule_recall(record, name, budget, objective=objective))
            layers = np.mean(per_layer, axis=0)
            entry[name] = {"mean": float(layers.mean()), "per_layer": [round(float(x), 4) for x in layers]}
        out[f"{share:g}"] = entry
    return out


def run_calibration(
    adapter: ModelAdapter,
    base: Policy,
    streams: Any,
    seeds: Sequence[int],
    heldout: Sequence[tuple[int, int]],
    budget_shares: Sequence[float] = (1 / 8, 1 / 4),
    chunk_frames: int = 8,
    progress: Any = None,
    objective: str = "value",
    kl_stream: Any = None,
    search_space: SearchSpace | None = None,
) -> tuple[Policy, dict[str, Any], Policy | None]:
    """Record calibration streams, calibrate by recall, optionally search on the runtime,
    and measure the result on held-out streams.

    Parameters
    ----------
    base : the heuristic (uncalibrated) policy of the same model
    streams : ``streams(seed, frames) -> FidelityStream``
    seeds : ``(seed, frames)`` of the calibration streams
    heldout : ``(seed, frames)`` of held-out streams (other seeds, other lengths)
    kl_stream : a calibration stream for the runtime search
        (:func:`~hermes_probe.runtime_search.coordinate_search` on KL(full || policy), starting
        from pure recency and using the recall calibration's pseudo-queries, forgetting
        rates, budget split and smoothing as its moves); then the held-out KL of the
        baselines and policies is measured on the first held-out stream too

    Returns
    -------
    (calibrated policy, report, the recall calibration alone as a policy when the runtime search
    ran, else None)
    """
    from hermes_policy.policy import ModelInfo, paper_default

    from .runtime_search import RuntimeKL, coordinate_search, recency_start

    def note(text: str) -> None:
        if progress:
            progress(text)

    records = []
    for seed, frames in seeds:
        note(f"recording calibration stream seed {seed} ({frames} frames)")
        records.append(record_stream(adapter, streams(seed, frames), chunk_frames))
    note("calibrating by recall")
    result = calibrate(records, budget_shares, objective=objective)
    recall_policy = calibrated_policy(base, result, {})
    search = None
    space = search_space or SearchSpace()
    if kl_stream is not None:
        runtime_kl = RuntimeKL(adapter, base, kl_stream, budget_shares, chunk_frames)
        search = coordinate_search(runtime_kl, recency_start(result.prompt, result.forgetting_rate), space,
                                   recall_split=result.budget_multiple, recall_smoothing=result.smoothing_scale,
                                   progress=note)
    chosen: Calibration | SearchPoint = result if search is None else search.point
    held = []
    for seed, frames in heldout:
        note(f"recording held-out stream seed {seed} ({frames} frames)")
        held.append(record_stream(adapter, streams(seed, frames), chunk_frames))
    provisional = calibrated_policy(base, chosen, {})
    paper = paper_default(ModelInfo.of(adapter), budget=base.budget)
    entrants = {"paper-default": paper, "heuristic": base, "calibrated": provisional}
    if search is not None:
        entrants["recall-calibrated"] = recall_policy
    measure = {"attention": "attention recall (head mean of the probes' attention at their answer positions)",
               "value": "value-weighted attention recall (the probes' attention at their answer positions times "
                        "each token's value-output norm ||W_O,h v||, summed over heads)"}[objective]
    description = (f"{measure}; copy probes and memory probes (kv, facts) weighted one half each, averaged "
                   "over layers and budgets; keep sets replayed through the rule's compression steps on "
                   "pseudo-query attention recorded on the full cache")
    if search is not None:
        description += ("; then a coordinate search on KL(full || policy) run on the real runtime, from pure "
                        "recency with an even split (see runtime_search)")
    report = {
        "objective": description,
        "objective_name": objective if search is None else f"{objective}+runtime-kl",
        "budget_shares": [float(s) for s in budget_shares],
        "calibration_streams": [{"seed": s, "frames": f} for s, f in seeds],
        "heldout_streams": [{"seed": s, "frames": f} for s, f in heldout],
        "grid": {"recency_weight": list(W_GRID), "forgetting_rate": list(K_GRID), "prompt": list(PROMPTS),
                 "budget_levels": list(BUDGET_LEVELS), "smoothing": list(SMOOTHING_SCALES)},
        "summary_tokens": ("tried per depth group by the runtime search" if search is not None and space.summary
                           else "off: attention recall cannot value a summary token"),
        "runtime_search": None if search is None else {
            "stream": {"seed": kl_stream.seed, "frames": len(kl_stream.frames)}, "space": space.to_dict(),
            "start_kl": search.start_value, "kl": search.value, "moves": search.history},
        "calibration_recall": result.objective,
        "calibration": recall_table(records, budget_shares, entrants, objective),
        "heldout": recall_table(held, budget_shares, entrants, objective),
        "heldout_other_objective": recall_table(held, budget_shares, entrants,
                                                "attention" if objective == "value" else "value"),
        "recall_choices": search_point(result).describe(),
        "choices": (search_point(result) if search is None else search.point).describe(),
    }
    if search is not None and heldout:
        seed, frames = heldout[0]
        note(f"held-out KL on stream seed {seed}")
        report["heldout_kl"] = heldout_kl(adapter, base, streams(seed, frames), budget_shares, entrants,
                                          chunk_frames, note)
        report["heldout_kl"]["stream"] = {"seed": seed, "frames": frames}
    heldout_summary = {share: {name: v["mean"] for name, v in entry.items()} for share, entry in report["heldout"].items()}
    provenance = {key: report[key] for key in ("objective", "objective_name", "budget_shares", "calibration_streams",
                                                "heldout_streams", "summary_tokens")}
    if search is not None:
        provenance["runtime_search"] = {k: v for k, v in report["runtime_search"].items() if k != "moves"}
        provenance["heldout_kl"] = report.get("heldout_kl")
    provenance["heldout_recall"] = heldout_summary
    provenance["uncalibrated_source"] = base.provenance.get("source", "probe")
    if search is None:
        return calibrated_policy(base, chosen, provenance), report, None
    recall_policy.provenance["calibration"] = {key: provenance[key] for key in (
        "calibration_streams", "heldout_streams", "heldout_recall", "uncalibrated_source")} | {
        "objective": measure, "objective_name": objective}
    return calibrated_policy(base, chosen, provenance), report, recall_policy


def heldout_kl(adapter: ModelAdapter, base: Policy, stream: FidelityStream, budget_shares: Sequence[float],
               policies: dict[str, Policy], chunk_frames: int, progress: Any = None) -> dict[str, Any]:
    """Runtime KL(full || rule) on ``stream`` (task-weighted, averaged over budget shares) for
    fifo, sink+recent and each of ``policies``."""
    from hermes_policy.retention import FifoRetention, SinkRecentRetention

    from .runtime_search import RuntimeKL

    measure = RuntimeKL(adapter, base, stream, budget_shares, chunk_frames)
    out: dict[str, Any] = {}
    for name, make in (("fifo", lambda b: FifoRetention(budget=b)),
                       ("sink-recent", lambda b: SinkRecentRetention(budget=b, sink=4))):
        if progress:
            progress(f"held-out KL: {name}")
        out[name] = measure.of_rule(make)
    for name, policy in policies.items():
        if progress:
            progress(f"held-out KL: {name}")
        out[f"hermes ({name})"] = measure.of_policy(policy)
    return {"kl": out}
