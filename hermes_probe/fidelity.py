"""The fidelity testbed: retention rules and policies scored on probes the full cache passes.

Per seed, one stream (:func:`hermes_policy.inputs.fidelity_tasks.fidelity_stream`) is streamed
once under the full cache and once per (rule or policy, budget); after the last frame
every probe is scored on each cache:

- ``logp``: log p of the answer's tokens, teacher-forced in the context the model uses
  (right after a prompt that ends before the value), summed over the answer's tokens;
- ``accuracy``: exact (every answer token top-1; copy: the share of top-1 tokens) or
  multiple choice (the option with the highest log p);
- ``kl``: KL(full || rule) of the next-token distributions at the answer positions
  (the same teacher-forced inputs in both caches), averaged over the positions.

Rows hold per-probe values so that means and 95% intervals over seeds and questions can be
computed (:func:`summarise`); the JSON is rewritten atomically after every cell and cells
already present are skipped on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hermes_policy.fileio.atomic import write_json_atomic
from hermes_policy.inputs.fidelity_tasks import FidelityStream, Probe
from hermes_policy.models.base import ModelAdapter
from hermes_policy.session import StreamingSession

SCHEMA = "hermes-fidelity/1"
INFORMATIVE_ACCURACY = 0.70
METRICS = ("accuracy", "kl", "logp")


@dataclass
class ProbeScore:
    """One probe on one cache.

    logprobs : FloatTensor ``(answer_tokens, vocab)`` (kept for the KL, not written)
    logp : summed log p of the answer tokens
    accuracy : 1/0 (exact or multiple choice) or the share of top-1 tokens (copy)
    """

    logprobs: torch.Tensor
    logp: float
    accuracy: float


def prompt_ids(adapter: ModelAdapter, probe: Probe) -> list[int]:
    """Token ids prefilled after the stream before the scored answer."""
    if probe.mode == "raw":
        return list(probe.prompt_ids) if probe.prompt_ids is not None else adapter.encode_text(probe.prompt)
    ids = adapter.question_piece(probe.prompt).input_ids.tolist()
    return ids + (adapter.encode_text(probe.lead) if probe.lead else [])


def token_logp(logprobs: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """``logprobs[j, ids[j]]`` for each row: ``(n, vocab)`` -> ``(n,)``."""
    return logprobs[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)]


def kl_rows(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of KL(p || q), both given as log-probabilities ``(n, vocab)``; nats."""
    p, q = reference.double(), other.double()
    return float((p.exp() * (p - q)).sum(-1).mean())


def score_probes(session: StreamingSession, probes: list[Probe], batch: int = 24) -> list[ProbeScore]:
    """Score every probe on ``session``'s cache (left as it was), ``batch`` blocks per forward.

    Each probe (and each multiple-choice option) is an independent query block of one
    forward: the same numbers as scoring them one at a time, for a fraction of the cost.
    """
    adapter = session.adapter
    items: list[tuple[list[int], list[int]]] = []
    owners: list[tuple[int, int | None]] = []  # (probe, option or None)
    for i, probe in enumerate(probes):
        prompt = prompt_ids(adapter, probe)
        items.append((prompt, probe.answer_ids))
        owners.append((i, None))
        for j, option in enumerate(probe.choices or []):
            if option != probe.answer_ids:
                items.append((prompt, option))
                owners.append((i, j))
    results: list[torch.Tensor] = []
    for start in range(0, len(items), batch):
        results.extend(session.batch_continuation_logprobs(items[start : start + batch]))
    main: dict[int, torch.Tensor] = {}
    options: dict[int, dict[int, float]] = {}
    for (i, j), (_, ids), logprobs in zip(owners, items, results, strict=True):
        if j is None:
            main[i] = logprobs
        else:
            options.setdefault(i, {})[j] = float(token_logp(logprobs, ids).sum())
    scores = []
    for i, probe in enumerate(probes):
        logprobs = main[i]
        per_token = token_logp(logprobs, probe.answer_ids)
        top1 = logprobs.argmax(-1) == torch.tensor(probe.answer_ids)
        if probe.task == "copy":
            accuracy = float(top1.float().mean())
        elif probe.choices is not None:
            option_logp = [options.get(i, {}).get(j, float(per_token.sum())) if option != probe.answer_ids
                           else float(per_token.sum()) for j, option in enumerate(probe.choices)]
            accuracy = float(int(np.argmax(option_logp)) == probe.correct_choice)
        else:
            accuracy = float(bool(top1.all()))
        scores.append(ProbeScore(logprobs=logprobs, logp=float(per_token.sum()), accuracy=accuracy))
    return scores


def stream_session(adapter: ModelAdapter, rule: Any, stream: FidelityStream, chunk_frames: int) -> StreamingSession:
    """A session under ``rule`` that has seen every frame of ``stream``."""
    session = StreamingSession(adapter, rule, chunk_frames=chunk_frames)
    session.add_frames(stream.frames)
    session.flush()
    return session


def cell_rows(
    stream: FidelityStream,
    scores: list[ProbeScore],
    reference: list[ProbeScore] | None,
    *,
    rule: str,
    policy: str | None,
    budget: int | None,
    tasks: Iterable[str],
) -> list[dict[str, Any]]:
    """One row per task for one (rule, budget, seed): means plus the per-probe values."""
    rows = []
    for task in tasks:
        idx = [i for i, p in enumerate(stream.probes) if p.task == task]
        if not idx:
            continue
        acc = [scores[i].accuracy for i in idx]
        logp = [scores[i].logp for i in idx]
        kl = [0.0 if reference is None else kl_rows(reference[i].logprobs, scores[i].logprobs) for i in idx]
        rows.append({
            "rule": rule, "policy": policy, "task": task, "budget": budget, "seed": stream.seed, "n": len(idx),
            "accuracy": float(np.mean(acc)), "kl": float(np.mean(kl)), "logp": float(np.mean(logp)),
            "positions": [stream.probes[i].position for i in idx],
            "values": {"accuracy": acc, "kl": kl, "logp": logp},
        })
    return rows


def row_key(row: dict[str, Any]) -> tuple:
    return (row["rule"], row["policy"], row["task"], row["budget"], row["seed"])


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier (partial) run at ``path``; empty when there is none."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return list(data.get("rows", []))


def save(path: Path, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write ``{"manifest", "rows", "summary"}`` atomically."""
    return write_json_atomic(path, {"schema": SCHEMA, "manifest": manifest, "rows": rows,
                                    "summary": summarise(rows)})


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("hermes-probe", "torch", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def device_name(adapter: ModelAdapter) -> str:
    device = adapter.device
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{device} ({torch.cuda.get_device_name(device)})"


def interval(values_by_seed: list[list[float]], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% interval of values grouped by seed (two-level bootstrap).

    Seeds are resampled, then questions within each drawn seed, so the interval covers
    both the variation between streams and between questions.

    Returns
    -------
    (mean, low, high)
    """
    groups = [np.asarray(v, dtype=float) for v in values_by_seed if len(v)]
    if not groups:
        return (math.nan, math.nan, math.nan)
    flat = np.concatenate(groups)
    mean = float(flat.mean())
    if len(flat) < 2:
        return (mean, mean, mean)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(len(groups), size=len(groups))
        draws = [groups[g][rng.integers(len(groups[g]), size=len(groups[g]))] for g in picked]
        stats[r] = np.concatenate(draws).mean()
    low, high = np.percentile(stats, [2.5, 97.5])
    return (mean, float(low), float(high))


def label(row: dict[str, Any]) -> str:
    """Display name: the rule, or ``RULE (NAME)`` for a policy (``hermes``, ``hermes-heads``)."""
    return row["rule"] if row["policy"] is None else f"{row['rule']} ({row['policy']})"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (label, task, budget): n, mean and 95% interval of each metric over seeds and
    questions, per-position accuracy, and whether the task is informative (the full
    cache's accuracy on it at least :data:`INFORMATIVE_ACCURACY`)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((label(row), row["task"], row["budget"]), []).append(row)
    full_acc: dict[str, float] = {}
    for (name, task, _), group in cells.items():
        if name == "full":
            values = [v for r in group for v in r["values"]["accuracy"]]
            full_acc[task] = float(np.mean(values))
    out = []
    for (name, task, budget), group in sorted(cells.items(), key=lambda c: (c[0][1], c[0][2] or 0, c[0][0])):
        entry: dict[str, Any] = {"label": name, "task": task, "budget": budget,
                                 "seeds": sorted(r["seed"] for r in group),
                                 "n": int(sum(r["n"] for r in group))}
        for metric in METRICS:
            mean, low, high = interval([r["values"][metric] for r in group])
            entry[metric] = {"mean": mean, "low": low, "high": high}
        by_position: dict[str, list[float]] = {}
        for r in group:
            for pos, acc in zip(r["positions"], r["values"]["accuracy"], strict=True):
                by_position.setdefault(pos, []).append(acc)
        entry["accuracy_by_position"] = {k: float(np.mean(v)) for k, v in sorted(by_position.items())}
        entry["informative"] = bool(full_acc.get(task, 0.0) >= INFORMATIVE_ACCURACY)
        out.append(entry)
    return out


def paired_difference(rows: list[dict[str, Any]], a: str, b: str, budget: int, tasks: list[str],
                      metric: str = "kl", resamples: int = 4000, seed: int = 0) -> dict[str, Any]:
    """``a - b`` on the same probes: per seed, the mean over ``tasks`` of each task's mean
    per-probe difference; then the mean over seeds with a 95% bootstrap interval over seeds,
    and on how many seeds ``a`` is lower. Only seeds where both have every task count.

    ``a``, ``b``: display labels (:func:`label`). Pairing removes the variation between
    streams and questions that both share, so small differences become visible.
    """
    by_key = {(label(r), r["task"], r["budget"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    per_seed = []
    for s in seeds:
        cells = [(by_key.get((a, t, budget, s)), by_key.get((b, t, budget, s))) for t in tasks]
        if any(x is None or y is None for x, y in cells):
            continue
        per_seed.append(np.mean([np.mean(np.asarray(x["values"][metric]) - np.asarray(y["values"][metric]))
                                 for x, y in cells]))
    if not per_seed:
        return {"a": a, "b": b, "budget": budget, "tasks": tasks, "seeds": 0, "mean": math.nan,
                "low": math.nan, "high": math.nan, "a_lower_on": 0}
    values = np.asarray(per_seed)
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(boots, [2.5, 97.5])
    return {"a": a, "b": b, "budget": budget, "tasks": tasks, "seeds": len(values), "mean": float(values.mean()),
            "low": float(low), "high": float(high), "a_lower_on": int((values < 0).sum())}


ProgressFn = Callable[[str], None]


def markdown_table(summary: list[dict[str, Any]], order: list[str] | None = None) -> str:
    """A markdown table of :func:`summarise`'s output: one line per (task, budget, label)."""
    lines = ["| task | budget | rule / policy | n | accuracy [95% CI] | log p(answer) [95% CI] | "
             "KL(full ‖ rule) [95% CI] | accuracy early / middle / recent |",
             "|---|---|---|---|---|---|---|---|"]
    rank = {name: i for i, name in enumerate(order or [])}
    entries = sorted(summary, key=lambda e: (e["task"], e["budget"] or 0, rank.get(e["label"], 99), e["label"]))
    for e in entries:
        def fmt(m: dict[str, float], digits: int = 3) -> str:
            return f"{m['mean']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"

        pos = " / ".join(f"{e['accuracy_by_position'].get(p, float('nan')):.2f}" for p in ("early", "middle", "recent"))
        task = e["task"] + ("" if e["informative"] else " (uninformative: full < 70%)")
        budget = "-" if e["budget"] is None else str(e["budget"])
        lines.append(f"| {task} | {budget} | {e['label']} | {e['n']} | {fmt(e['accuracy'])} | "
                     f"{fmt(e['logp'], 2)} | {fmt(e['kl'])} | {pos} |")
    return "\n".join(lines)


@dataclass
class Contender:
    """One rule (``policy`` None) or policy (``policy`` its NAME) to stream under.

    make : budget -> a retention rule (a policy's per-layer budgets rescaled to it)
    """

    rule: str
    policy: str | None
    make: Callable[[int], Any]


def rescaled_policy(policy: Any, budget: int) -> Any:
    """``policy`` with per-layer budgets summing to ``budget * layers``, split in the
    proportions of its own per-layer budgets (an even split when they are equal)."""
    from hermes_policy.policy import Policy, split_budget

    data = policy.to_dict()
    weights = [float(layer["budget"]) for layer in data["layers"]]
    budgets = split_budget(weights, budget)
    floor = policy.model.tokens_per_frame
    if min(budgets) < floor:  # lift layers below one frame, taking from the largest
        for i in range(len(budgets)):
            while budgets[i] < floor:
                j = int(np.argmax(budgets))
                budgets[j] -= 1
                budgets[i] += 1
    for layer, b in zip(data["layers"], budgets, strict=True):
        layer["budget"] = int(b)
    data["budget"]["video_tokens_per_layer"] = int(budget)
    return Policy.from_dict(data, "rescaled policy")


def contenders(rules: list[str], policies: dict[str, Any], model_info: Any) -> list[Contender]:
    """Baseline rules by name and HERMES policies by NAME (a Policy, or ``"paper-default"``); a
    ``hermes-policy/2`` policy runs as ``hermes-heads`` at ``Policy.with_budget`` (its heads'
    windows scaled with the budget, equal effective memory: ``num_kv_heads x budget`` per
    layer), the others as ``hermes`` with their per-layer budgets rescaled."""
    from hermes_policy.policy import paper_default
    from hermes_policy.retention import (
        AttentionRetention,
        FifoRetention,
        HermesRetention,
        RetrievalRetention,
        SinkRecentRetention,
        UniformRetention,
        WindowRetention,
    )

    per_frame = model_info.tokens_per_frame
    makers: dict[str, Callable[[int], Any]] = {
        "fifo": lambda b: FifoRetention(budget=b),
        "sink-recent": lambda b: SinkRecentRetention(budget=b, sink=4),
        "uniform": lambda b: UniformRetention(budget=b),
        "attention-only": lambda b: AttentionRetention(budget=b),
        # the question-time baselines at the same GPU memory: the window holds as many frames
        # as the budget; retrieval keeps half the budget as its sliding window and brings back
        # one chunk per layer at a question (so a question may see up to a chunk more)
        "window": lambda b: WindowRetention(frames=max(1, b // per_frame)),
        "retrieval": lambda b: RetrievalRetention(budget=max(per_frame, b // 2), retrieve_chunks=1),
    }
    out = []
    for name in rules:
        if name == "full":
            continue
        if name not in makers:
            raise ValueError(f"unknown rule {name!r}; choose from full, {', '.join(makers)}")
        out.append(Contender(name, None, makers[name]))
    for name, policy in policies.items():
        if policy != "paper-default" and policy.per_head:  # schema 2: tokens per KV head
            from hermes_policy.retention import PerHeadRetention

            out.append(Contender("hermes-heads", name, lambda b, p=policy: PerHeadRetention(policy=p.with_budget(b))))
        elif policy == "paper-default":
            out.append(Contender("hermes", name, lambda b: HermesRetention(policy=paper_default(model_info, budget=b))))
        else:
            out.append(Contender("hermes", name, lambda b, p=policy: HermesRetention(policy=rescaled_policy(p, b))))
    return out


def run_fidelity(
    adapter: ModelAdapter,
    streams: Callable[[int], FidelityStream],
    seeds: list[int],
    budgets: list[int],
    entrants: list[Contender],
    tasks: list[str],
    out: Path,
    manifest: dict[str, Any],
    chunk_frames: int = 8,
    progress: Callable[[str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Stream every seed under the full cache and each entrant at each budget; score the
    probes; append rows and rewrite ``out`` after every cell. Cells already in ``out``
    (same rule, policy, task, budget, seed) are skipped; the full cache is rerun for a
    seed only when one of its cells is still missing (the KL needs its distributions).

    ``progress(description, steps)`` is called after each finished step (one streaming).
    """
    rows = load_rows(out)
    done = {row_key(r) for r in rows}

    def missing(rule: str, policy: str | None, budget: int | None, seed: int) -> bool:
        return any((rule, policy, t, budget, seed) not in done for t in tasks)

    for seed in seeds:
        todo = [(e, b) for e in entrants for b in budgets if missing(e.rule, e.policy, b, seed)]
        full_missing = missing("full", None, None, seed)
        if not todo and not full_missing:
            if progress:
                progress(f"seed {seed}: done earlier", 1 + len(entrants) * len(budgets))
            continue
        stream = streams(seed)
        from hermes_policy.retention import FullRetention

        session = stream_session(adapter, FullRetention(), stream, chunk_frames)
        reference = score_probes(session, stream.probes)
        del session
        if full_missing:
            rows.extend(r for r in cell_rows(stream, reference, None, rule="full", policy=None, budget=None,
                                             tasks=tasks) if row_key(r) not in done)
            done.update(row_key(r) for r in rows)
            save(out, manifest, rows)
        if progress:
            progress(f"seed {seed}: full", 1 + len(entrants) * len(budgets) - len(todo))
        for entrant, budget in todo:
            session = stream_session(adapter, entrant.make(budget), stream, chunk_frames)
            scores = score_probes(session, stream.probes)
            del session
            new = [r for r in cell_rows(stream, scores, reference, rule=entrant.rule, policy=entrant.policy,
                                        budget=budget, tasks=tasks) if row_key(r) not in done]
            rows.extend(new)
            done.update(row_key(r) for r in new)
            save(out, manifest, rows)
            if progress:
                progress(f"seed {seed}: {entrant.policy or entrant.rule} @ {budget}", 1)
    return rows
