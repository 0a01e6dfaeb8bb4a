"""How stable the probe's per-layer roles and tiers are across streams (bootstrap).

Given one attention profile per stream (``analyze`` runs on different seeds and lengths),
streams are resampled with replacement, their profiles merged, and the metrics, role
scores ``u_l`` and the best contiguous tier split recomputed each time. Reported per layer:
the role score's 95% interval, and how often the layer keeps the tier and the role it has
on all streams together. A layer is *uncertain* when either agreement is below
:data:`AGREEMENT`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import compute_metrics
from .profiles import AttentionProfile
from .tiers import best_contiguous_split, role_scores

AGREEMENT = 0.8


def merged(profiles: Sequence[AttentionProfile]) -> AttentionProfile:
    """The sum of ``profiles`` (a new profile; the inputs are untouched)."""
    out = copy.deepcopy(profiles[0])
    for other in profiles[1:]:
        out.merge(other)
    return out


def roles_of(profile: AttentionProfile) -> tuple[np.ndarray, list[str], list[str]]:
    """(role scores ``(layers,)``, contiguous tier of each layer, own role of each layer)."""
    scores = role_scores(compute_metrics(profile))
    fit = best_contiguous_split(scores)
    return scores, fit.tier_of_layer, list(fit.roles)


@dataclass
class Stability:
    """Per-layer bootstrap results.

    score, low, high : role score on all streams and its 95% interval ``(layers,)``
    tier, role : tier and role on all streams
    tier_agreement, role_agreement : share of resamples agreeing with them ``(layers,)``
    resamples, streams : bootstrap size and number of streams
    """

    score: np.ndarray
    low: np.ndarray
    high: np.ndarray
    tier: list[str]
    role: list[str]
    tier_agreement: np.ndarray
    role_agreement: np.ndarray
    resamples: int
    streams: int

    @property
    def uncertain(self) -> list[int]:
        return [i for i in range(len(self.tier))
                if self.tier_agreement[i] < AGREEMENT or self.role_agreement[i] < AGREEMENT]

    def to_dict(self) -> dict[str, Any]:
        return {
            "streams": self.streams, "resamples": self.resamples, "agreement_threshold": AGREEMENT,
            "uncertain_layers": self.uncertain,
            "layers": [
                {"index": i, "role_score": round(float(self.score[i]), 4),
                 "interval": [round(float(self.low[i]), 4), round(float(self.high[i]), 4)],
                 "tier": self.tier[i], "tier_agreement": round(float(self.tier_agreement[i]), 3),
                 "role": self.role[i], "role_agreement": round(float(self.role_agreement[i]), 3)}
                for i in range(len(self.tier))
            ],
        }


def bootstrap(profiles: Sequence[AttentionProfile], resamples: int = 200, seed: int = 0) -> Stability:
    """Resample streams with replacement ``resamples`` times (see module docstring)."""
    if len(profiles) < 2:
        raise ValueError("stability needs profiles of at least two streams")
    score, tier, role = roles_of(merged(profiles))
    rng = np.random.default_rng(seed)
    scores, tier_hits, role_hits = [], np.zeros(len(tier)), np.zeros(len(tier))
    for _ in range(resamples):
        pick = rng.integers(len(profiles), size=len(profiles))
        s, t, r = roles_of(merged([profiles[i] for i in pick]))
        scores.append(s)
        tier_hits += np.array([a == b for a, b in zip(t, tier, strict=True)])
        role_hits += np.array([a == b for a, b in zip(r, role, strict=True)])
    scores_arr = np.array(scores)
    low, high = np.percentile(scores_arr, [2.5, 97.5], axis=0)
    return Stability(score, low, high, tier, role, tier_hits / resamples, role_hits / resamples, resamples,
                     len(profiles))


def uncertain_lines(stability: dict[str, Any]) -> list[str]:
    """Readable lines for ``show`` and reports from :meth:`Stability.to_dict`."""
    layers = stability.get("uncertain_layers", [])
    head = (f"stability ({stability['streams']} streams, {stability['resamples']} bootstrap resamples): "
            + ("every layer keeps its tier and role" if not layers else
               f"{len(layers)} uncertain layers (tier or role agreement < {stability['agreement_threshold']:.0%})"))
    lines = [head]
    for entry in stability.get("layers", []):
        if entry["index"] in layers:
            lines.append(f"  layer {entry['index']}: tier {entry['tier']} {entry['tier_agreement']:.0%}, role "
                         f"{entry['role']} {entry['role_agreement']:.0%}, role score {entry['role_score']:.2f} "
                         f"[{entry['interval'][0]:.2f}, {entry['interval'][1]:.2f}]")
    return lines
