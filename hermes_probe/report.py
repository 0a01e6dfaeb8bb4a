"""Readable summaries: the analysis report (markdown) and the `show` view of a policy."""

from __future__ import annotations

from typing import Any

import numpy as np

from hermes_policy.policy import TIERS, Policy

from .heads import EVIDENCE_ORDER, WINDOW_RECALL, HeadMetrics, HeadRoles, mixed_layers
from .metrics import ProfileMetrics
from .tiers import TierFit

RECENCY_BIASED = 0.3  # recency share (3x uniform on the newest 10%) for "recency-biased"
PERIODIC = 0.3  # periodicity above which a layer is called frame-periodic
SPARSE = 0.3  # top-1% mass (30x uniform) above which a layer is called sparse


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    if not indices:
        return "none"
    parts, start, prev = [], indices[0], indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def findings(metrics: ProfileMetrics, fit: TierFit) -> list[str]:
    """Plain-language statements of what the probe measured."""
    share = np.nan_to_num(metrics.recency_share)
    recency_layers = [i for i, r in enumerate(share) if r >= RECENCY_BIASED]
    periodic_layers = [i for i, p in enumerate(metrics.periodicity) if p >= PERIODIC]
    sparse_layers = [i for i, m in enumerate(metrics.top_mass) if m >= SPARSE]
    both = sorted(set(recency_layers) & set(periodic_layers))
    flat = [i for i in range(len(share)) if i not in recency_layers]
    lines = [
        f"Recency-biased layers (at least {RECENCY_BIASED:.0%} of the attention on the newest 10% "
        f"of the window, i.e. 3x uniform): {_ranges(recency_layers)}; little or no recency bias: "
        f"{_ranges(flat)}.",
        f"Frame-periodic layers (periodicity >= {PERIODIC} at the frame period of "
        f"{metrics.period} tokens): {_ranges(periodic_layers)}.",
        f"Sparse layers (top 1% of tokens take >= {SPARSE:.0%} of the attention): {_ranges(sparse_layers)}.",
    ]
    if both:
        lines.append(f"Layers that mix strong recency with a per-frame rhythm: {_ranges(both)}.")
    if periodic_layers:
        phases = np.bincount(metrics.anchor_phase[periodic_layers], minlength=metrics.period)
        top = int(np.argmax(phases))
        lines.append(
            f"Anchor position within a frame (most attended offset) in the periodic layers: "
            f"offset {top} in {int(phases[top])} of {len(periodic_layers)} layers."
        )
    measured = [int(metrics.measured_period[i]) for i in periodic_layers]
    if measured:
        values, counts = np.unique(measured, return_counts=True)
        lines.append(f"Measured rhythm in those layers: every {int(values[np.argmax(counts)])} tokens.")
    tiers = ", ".join(f"{t} {a}-{b}" for t, (a, b) in fit.tiers.items())
    lines.append(f"Best contiguous tiers: {tiers} (R^2 = {fit.r2:.2f}).")
    if fit.mismatches:
        detail = "; ".join(
            f"{role}: {_ranges([i for i in fit.mismatches if fit.roles[i] == role])}"
            for role in TIERS if any(fit.roles[i] == role for i in fit.mismatches)
        )
        lines.append(
            f"Contiguous tiers do not fit {len(fit.mismatches)} layers, whose own role is "
            f"{detail}. Their per-layer policy entries follow their own measurements."
        )
    else:
        lines.append("Every layer's own role matches its contiguous tier.")
    return lines


def head_findings(metrics: HeadMetrics, roles: HeadRoles) -> list[str]:
    """Plain-language statements of the per-KV-head classification."""
    layers, kv_heads = metrics.shape
    counts = {role: int((roles.roles == role).sum()) for role in EVIDENCE_ORDER}
    mixed = mixed_layers(roles)
    lines = [
        f"KV heads ({kv_heads} per layer, each the mean of its {metrics.group_size} query head(s)): "
        + ", ".join(f"{counts[r]} {r}" for r in ("streaming", "anchor", "retrieval"))
        + f"; median confidence {float(np.median(roles.confidence)):.2f}.",
        f"Layers whose KV heads have different roles: {_ranges(mixed)}.",
    ]
    if metrics.budget >= metrics.window:
        lines.append(f"The policy budget ({metrics.budget} tokens) covers the whole probe window "
                     f"({metrics.window} tokens): recall at the budget is 1 for every head.")
    return lines


def head_section(metrics: HeadMetrics, roles: HeadRoles) -> list[str]:
    """The report's per-KV-head table (markdown lines)."""
    lines = [
        "## Per KV head",
        "",
        *[f"- {line}" for line in head_findings(metrics, roles)],
        "",
        f"Recall at budget: share of the head's attention on the newest {metrics.budget} tokens; "
        f"window for {int(WINDOW_RECALL * 100)}%: newest tokens (whole frames) holding that share.",
        "",
        "| layer | KV head | role | confidence | recency share | decay/token | periodicity | anchor | "
        "top-1% | recall at budget | window for 90% |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    layers, kv_heads = metrics.shape
    for layer in range(layers):
        for head in range(kv_heads):
            at = (layer, head)
            lines.append(
                f"| {layer} | {head} | {roles.roles[at]} | {roles.confidence[at]:.2f} | "
                f"{metrics.recency_share[at]:.3f} | {metrics.decay_rate[at]:.2e} | {metrics.periodicity[at]:.3f} | "
                f"{metrics.anchor_phase[at]} (x{metrics.anchor_strength[at]:.1f}) | {metrics.top_mass[at]:.3f} | "
                f"{metrics.budget_recall[at]:.3f} | {metrics.needed_window[at]} |"
            )
    return lines


def render_report(policy: Policy, metrics: ProfileMetrics, fit: TierFit, failed: dict[str, str],
                  heads: tuple[HeadMetrics, HeadRoles] | None = None) -> str:
    probe = policy.provenance.get("probe", {})
    lines = [
        f"# hermes-probe report: {policy.model.name_or_path}",
        "",
        f"{policy.model.architecture}, {policy.model.num_layers} layers, {policy.model.num_heads} heads, "
        f"{policy.model.tokens_per_frame} tokens per frame. Protocol: {probe.get('streams')} stream(s), "
        f"{probe.get('probes')} probe queries, fps {probe.get('fps')}, chunks of {probe.get('chunk_frames')} "
        f"frames, FIFO window {metrics.window} tokens (requested {probe.get('fifo_budget')}).",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in findings(metrics, fit)],
        "",
        "## Per layer",
        "",
        "| layer | tier | own role | recency share | newest-frame x | decay/token | periodicity | anchor "
        "| entropy | top-1% | w | k | lambda |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, layer in enumerate(policy.layers):
        lines.append(
            f"| {i} | {layer.tier} | {fit.roles[i]} | {metrics.recency_share[i]:.3f} | "
            f"{metrics.newest_frame_ratio[i]:.2f} | {metrics.decay_rate[i]:.2e} | "
            f"{metrics.periodicity[i]:.3f} | {metrics.anchor_phase[i]} (x{metrics.anchor_strength[i]:.1f}) | "
            f"{metrics.entropy[i]:.3f} | {metrics.top_mass[i]:.3f} | {layer.recency_weight:.2f} | "
            f"{layer.forgetting_rate:.1f} | {layer.smoothing:.2f} |"
        )
    if heads is not None:
        lines += ["", *head_section(*heads)]
    if failed:
        lines += ["", "## Streams that could not be probed", ""]
        lines += [f"- {name}: {reason}" for name, reason in failed.items()]
    return "\n".join(lines) + "\n"


STABILITY_HEADING = "## Stability of the roles"


def with_stability(report: str, stability: dict[str, Any]) -> str:
    """``report`` (a ``report.md``) with its stability section set to ``stability``
    (:meth:`~hermes_probe.stability.Stability.to_dict`): added at the end, or replaced
    where an earlier run wrote one."""
    from .stability import uncertain_lines

    lines = uncertain_lines(stability)
    section = [STABILITY_HEADING, "", lines[0][0].upper() + lines[0][1:] + ".", ""]
    if len(lines) > 1:
        section += ["| layer | tier (agreement) | role (agreement) | role score [95% interval] |", "|---|---|---|---|"]
        uncertain = set(stability.get("uncertain_layers", []))
        for entry in stability.get("layers", []):
            if entry["index"] in uncertain:
                low, high = entry["interval"]
                section.append(f"| {entry['index']} | {entry['tier']} ({entry['tier_agreement']:.0%}) | "
                               f"{entry['role']} ({entry['role_agreement']:.0%}) | "
                               f"{entry['role_score']:.2f} [{low:.2f}, {high:.2f}] |")
        section.append("")
    section.append("Uncertain layers' parameters rest on measurements that other streams would change; "
                   "probe more streams (`hermes-probe stability`) before trusting them.")
    body = report.split("\n" + STABILITY_HEADING)[0].rstrip("\n")
    return body + "\n\n" + "\n".join(section) + "\n"
