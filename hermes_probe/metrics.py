"""Per-layer and per-head measurements of an attention profile. Pure functions on arrays.

Notation: ``a(d)`` is the mean attention a probe query puts on the cached stream token
``d`` positions before the newest one (renormalised over stream tokens, so it sums to 1
over the window), ``W`` the window length and ``N`` the frame period in tokens.

Recency
    ``newest_frame_ratio = sum_{d<N} a(d) / (N / W)``: attention on the newest frame
    relative to a uniform spread (1 = no recency bias).
    ``recency_share = sum_{d < ceil(W/10)} a(d)``: mass on the newest 10% of the window
    (0.1 = uniform, 1 = only recent tokens).
    ``decay_rate``: per-token rate ``kappa`` of an exponential ``a ~ exp(-kappa d)``, fitted
    by least squares to ``log`` of the frame-averaged profile (averaging over each frame's
    tokens first removes the within-frame rhythm from the fit).
Periodicity
    ``x(d) = log a(d)`` minus its moving average over one frame (which removes the smooth
    recency trend) and minus the mean of what is left (a constant is no rhythm; for an even
    ``N`` the moving average sits half a token off-centre, so a linear trend leaves one).
    Folding ``x`` at the period ``N`` (averaging all ``d`` with the same ``d mod N``) then
    keeps exactly its power at the frame frequency and its harmonics;
    ``periodicity = E_fold / (E_fold + E_rest + eps)``, the share of that detrended
    log-attention variation which repeats every frame (``eps = 0.05**2``: variations under
    5% are not structure). ``measured_period`` is the smallest lag in ``[2, 4N]`` whose
    chance-corrected periodicity (noise kept by folding removed) is within 90% of the best.
Anchors
    From the phase profile (mean attention per token at each in-frame offset, tokens
    identified by their frame, so independent of chunk separators): ``anchor_phase`` is the
    offset with most attention, ``anchor_strength = max / mean`` (1 = flat).
Sparsity
    ``entropy``: per probe, Shannon entropy of the attention over the window divided by
    ``log W`` (1 = uniform); ``top_mass``: mass of the top 1% tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d

from .profiles import AttentionProfile

PERIODICITY_EPS = 0.05**2
TINY = 1e-12


def valid_window(profile: np.ndarray) -> np.ndarray:
    """The finite prefix of a distance profile (distances every probe reached)."""
    finite = np.isfinite(profile)
    end = int(np.argmin(finite)) if not finite.all() else profile.shape[-1]
    return profile[:end]


def newest_frame_ratio(a: np.ndarray, period: int) -> float:
    window = a.shape[0]
    if window == 0:
        return float("nan")
    n = min(period, window)
    return float(a[:n].sum() / (n / window) / max(a.sum(), TINY))


def recency_share(a: np.ndarray) -> float:
    window = a.shape[0]
    if window == 0:
        return float("nan")
    return float(a[: int(np.ceil(window / 10))].sum() / max(a.sum(), TINY))


def frame_average(a: np.ndarray, period: int) -> np.ndarray:
    """Mean of ``a`` over consecutive blocks of ``period`` distances (whole blocks only)."""
    blocks = a.shape[0] // period
    return a[: blocks * period].reshape(blocks, period).mean(axis=1)


def decay_rate(a: np.ndarray, period: int) -> float:
    """Fitted per-token exponential decay rate (>= 0 means attention falls with distance)."""
    frames = frame_average(a, period)
    if frames.shape[0] < 2:
        return float("nan")
    x = np.arange(frames.shape[0]) * period + (period - 1) / 2
    slope = np.polyfit(x, np.log(frames + TINY), 1)[0]
    return float(-slope)


def folded_periodicity(a: np.ndarray, period: int, chance_corrected: bool = False) -> float:
    """Share of the detrended log-attention variation that repeats every ``period`` tokens.

    With ``chance_corrected``, the energy that folding keeps from pure noise (a fraction
    ``1 / r`` of it for ``r`` repetitions) is removed first: ``E_fold <- (r E_fold - E) / (r - 1)``
    with ``E`` the total residual energy. Longer lags fold fewer repetitions and would
    otherwise score higher by chance; :func:`measured_period` compares lags this way.
    """
    if period < 2 or a.shape[0] < 3 * period:
        return 0.0
    x = np.log(a + TINY)
    residual = x - uniform_filter1d(x, size=period, mode="nearest")
    n = (residual.shape[0] // period) * period
    residual = residual[:n] - residual[:n].mean()
    folded = residual.reshape(-1, period).mean(axis=0)
    periodic = np.tile(folded, n // period)
    e_fold = float(np.mean(periodic**2))
    e_rest = float(np.mean((residual - periodic) ** 2))
    if chance_corrected:
        repeats = n // period
        total = e_fold + e_rest
        e_fold = max(0.0, (repeats * e_fold - total) / (repeats - 1))
        e_rest = total - e_fold
    return e_fold / (e_fold + e_rest + PERIODICITY_EPS)


def measured_period(a: np.ndarray, period: int) -> int:
    """Smallest lag in ``[2, 4 * period]`` whose chance-corrected folded periodicity is >= 90%
    of the best (a multiple of the true period folds the same rhythm, with more noise)."""
    top = min(4 * period, a.shape[0] // 3)
    if top < 2:
        return 0
    lags = np.arange(2, top + 1)
    scores = np.array([folded_periodicity(a, int(lag), chance_corrected=True) for lag in lags])
    if scores.max() <= 0:
        return 0
    return int(lags[np.argmax(scores >= 0.9 * scores.max())])


def anchor(phase: np.ndarray) -> tuple[int, float]:
    """(offset with most attention, max / mean) of a phase profile."""
    if not np.isfinite(phase).any():
        return -1, float("nan")
    phase = np.nan_to_num(phase, nan=0.0)
    return int(np.argmax(phase)), float(phase.max() / max(phase.mean(), TINY))


@dataclass
class ProfileMetrics:
    """Measurements per layer (``(layers,)``, from head-averaged profiles) and per head
    (``(layers, heads)``). See the module docstring for definitions."""

    period: int
    window: int
    newest_frame_ratio: np.ndarray
    recency_share: np.ndarray
    decay_rate: np.ndarray
    periodicity: np.ndarray
    measured_period: np.ndarray
    anchor_phase: np.ndarray
    anchor_strength: np.ndarray
    entropy: np.ndarray
    top_mass: np.ndarray
    video_mass: np.ndarray
    head_recency_share: np.ndarray
    head_periodicity: np.ndarray
    head_entropy: np.ndarray

    def layer_table(self) -> list[dict[str, float]]:
        """One dict per layer of the per-layer measurements (for reports and JSON)."""
        keys = [k for k, v in asdict(self).items() if isinstance(v, np.ndarray) and v.ndim == 1]
        return [{k: float(getattr(self, k)[i]) for k in keys} for i in range(len(self.periodicity))]


def compute_metrics(profile: AttentionProfile) -> ProfileMetrics:
    """All measurements of a profile."""
    layers, heads, period = profile.num_layers, profile.num_heads, profile.period
    distance = profile.distance_profile()
    phase = profile.phase_profile()
    window = profile.window
    out = {name: np.zeros(layers) for name in (
        "newest_frame_ratio", "recency_share", "decay_rate", "periodicity", "anchor_strength")}
    out["measured_period"] = np.zeros(layers, dtype=np.int64)
    out["anchor_phase"] = np.zeros(layers, dtype=np.int64)
    head_recency = np.zeros((layers, heads))
    head_periodicity = np.zeros((layers, heads))
    for layer in range(layers):
        a = valid_window(distance[layer].mean(axis=0))
        out["newest_frame_ratio"][layer] = newest_frame_ratio(a, period)
        out["recency_share"][layer] = recency_share(a)
        out["decay_rate"][layer] = decay_rate(a, period)
        out["periodicity"][layer] = folded_periodicity(a, period)
        out["measured_period"][layer] = measured_period(a, period)
        phase_layer = phase[layer].mean(axis=0)
        out["anchor_phase"][layer], out["anchor_strength"][layer] = anchor(phase_layer)
        for head in range(heads):
            ah = valid_window(distance[layer, head])
            head_recency[layer, head] = recency_share(ah)
            head_periodicity[layer, head] = folded_periodicity(ah, period)
    entropy = profile.mean("entropy")
    return ProfileMetrics(
        period=period,
        window=window,
        entropy=entropy.mean(axis=1),
        top_mass=profile.mean("top_mass").mean(axis=1),
        video_mass=profile.mean("video_mass").mean(axis=1),
        head_recency_share=head_recency,
        head_periodicity=head_periodicity,
        head_entropy=entropy,
        **out,
    )
