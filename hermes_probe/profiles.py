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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.errors import HermesError
from hermes_policy.fileio.atomic import atomic_path
from hermes_policy.fileio.json_input import parse_json_text

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
        if path.stat().st_size == 0:
            raise ProfileError(f"{path} is empty, not a hermes-probe profile")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = parse_json_text(str(data["header"]), f"{path} header", ProfileError)
                arrays = {name: np.array(data[name], dtype=np.float64) for name in _ARRAYS}
        except ProfileError:
            raise
        # EOFError: a truncated file (click would print a bare "Aborted!" for it)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ProfileError(f"{path} is not a hermes-probe profile: {exc}") from None
        if not isinstance(header, dict):
            raise ProfileError(f"{path} is not a hermes-probe profile: its header is not an object")
        sizes = {}
        for key in ("num_layers", "num_heads", "max_distance", "period", "probes"):
            value = header.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProfileError(f"{path}: header field {key!r} must be a non-negative integer, got {value!r}")
            sizes[key] = value
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise ProfileError(f"{path}: header field 'meta' must be an object")
        return cls(**sizes, meta=dict(meta), **arrays)

    def check_usable(self, source: str = "profile") -> None:
        """Raise ProfileError with the reason when no sound analysis can come from this profile:
        no probes, NaN or negative sums, no attention at all, impossible per-probe means, or a
        window too short to tell recency from a per-frame rhythm."""
        if self.num_layers < 3:
            raise ProfileError(f"{source}: {self.num_layers} layer(s); three tiers need at least 3")
        if self.probes < 1:
            raise ProfileError(f"{source} holds no probe queries; nothing to analyse")
        for name in _ARRAYS:
            values = getattr(self, name)
            if not np.isfinite(values).all():
                raise ProfileError(f"{source}: {name} contains NaN or infinite values")
            if (values < 0).any():
                raise ProfileError(f"{source}: {name} contains negative values")
        if not self.distance_sum.any() or not self.distance_count.any():
            raise ProfileError(f"{source} records no attention at all (its sums are zero)")
        for name in ("entropy", "top_mass", "video_mass"):
            mean = self.mean(name)
            if (mean > 1.0 + 1e-6).any():
                raise ProfileError(f"{source}: the mean {name} per probe reaches {mean.max():.3g}; "
                                   "as a share it cannot exceed 1")
        if self.window < 2 * self.period:
            raise ProfileError(
                f"{source}: its window is {self.window} tokens, less than two frames of "
                f"{self.period} tokens; recency and a per-frame rhythm cannot be measured from it"
            )
