"""Attention profiles: what the recorder accumulates, saved without pickle.

A profile holds running sums, never attention matrices, so hundreds of probe queries over
long streams fit in memory:

- ``distance_sum[l, h, d]``: attention (renormalised over the cached stream tokens and
  averaged over the query's tokens) on the token ``d`` positions before the newest one;
  ``distance_count[l, d]`` counts the probes whose window reached ``d``.
- ``phase_sum[l, h, p]``: attention on tokens at offset ``p`` within their frame;
  ``phase_count[l, p]`` counts those tokens.
- ``entropy_sum``, ``top_mass_sum``, ``video_mass_sum`` (``(l, h)``): per probe, the
  normalised entropy of the attention over stream tokens, the mass of its top 1% tokens,
  and the share of the query's attention that went to stream tokens at all.

Saved as ``.npz`` (``allow_pickle=False``) with the metadata as a JSON string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.atomic import atomic_path
from hermes_policy.errors import HermesError

_ARRAYS = (
    "distance_sum",
    "distance_count",
    "phase_sum",
    "phase_count",
    "entropy_sum",
    "top_mass_sum",
    "video_mass_sum",
)


class ProfileError(HermesError):
    """A saved profile cannot be read or does not fit another one."""


@dataclass
class AttentionProfile:
    """Accumulated attention statistics of one model (see module docstring for the arrays).

    Parameters
    ----------
    num_layers, num_heads : model shape
    max_distance : longest distance (in tokens) recorded
    period : tokens of one frame (the phase axis length)
    """

    num_layers: int
    num_heads: int
    max_distance: int
    period: int
    probes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    distance_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    distance_count: np.ndarray = field(default=None)  # type: ignore[assignment]
    phase_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    phase_count: np.ndarray = field(default=None)  # type: ignore[assignment]
    entropy_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    top_mass_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    video_mass_sum: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        shapes = {
            "distance_sum": (self.num_layers, self.num_heads, self.max_distance),
            "distance_count": (self.num_layers, self.max_distance),
            "phase_sum": (self.num_layers, self.num_heads, self.period),
            "phase_count": (self.num_layers, self.period),
            "entropy_sum": (self.num_layers, self.num_heads),
            "top_mass_sum": (self.num_layers, self.num_heads),
            "video_mass_sum": (self.num_layers, self.num_heads),
        }
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value is None:
                setattr(self, name, np.zeros(shape, dtype=np.float64))
            elif value.shape != shape:
                raise ProfileError(f"profile array {name} has shape {value.shape}, expected {shape}")

    # -- derived ---------------------------------------------------------------------
    def distance_profile(self) -> np.ndarray:
        """Mean attention by distance ``(layers, heads, max_distance)``; NaN where unseen."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.distance_sum / self.distance_count[:, None, :]

    def phase_profile(self) -> np.ndarray:
        """Mean attention per token by in-frame offset ``(layers, heads, period)``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.phase_sum / self.phase_count[:, None, :]

    def mean(self, name: str) -> np.ndarray:
        """Per-probe mean of ``entropy``, ``top_mass`` or ``video_mass`` ``(layers, heads)``."""
        total = getattr(self, f"{name}_sum")
        return total / max(self.probes, 1)

    @property
    def window(self) -> int:
        """Longest distance any probe reached."""
        seen = np.nonzero(self.distance_count.max(axis=0))[0]
        return int(seen[-1]) + 1 if seen.size else 0

    # -- combining and storage -------------------------------------------------------
    def merge(self, other: AttentionProfile) -> None:
        """Add another profile's sums into this one (same model and period)."""
        if (other.num_layers, other.num_heads, other.period) != (self.num_layers, self.num_heads, self.period):
            raise ProfileError("cannot merge profiles of different models or frame periods")
        if other.max_distance > self.max_distance:
            self._grow(other.max_distance)
        for name in _ARRAYS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name.startswith("distance"):
                mine[..., : theirs.shape[-1]] += theirs
            else:
                mine += theirs
        self.probes += other.probes

    def _grow(self, max_distance: int) -> None:
        pad = max_distance - self.max_distance
        self.distance_sum = np.pad(self.distance_sum, ((0, 0), (0, 0), (0, pad)))
        self.distance_count = np.pad(self.distance_count, ((0, 0), (0, pad)))
        self.max_distance = max_distance

    def save(self, path: str | Path) -> Path:
        """Write atomically as ``.npz`` (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "max_distance": self.max_distance,
            "period": self.period,
            "probes": self.probes,
            "meta": self.meta,
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                header=np.array(json.dumps(header)),
                **{name: getattr(self, name) for name in _ARRAYS},
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttentionProfile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {name: np.array(data[name], dtype=np.float64) for name in _ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise ProfileError(f"{path} is not a hermes-probe profile: {exc}") from None
        return cls(
            num_layers=int(header["num_layers"]),
            num_heads=int(header["num_heads"]),
            max_distance=int(header["max_distance"]),
            period=int(header["period"]),
            probes=int(header["probes"]),
            meta=dict(header.get("meta", {})),
            **arrays,
        )
