"""The retention protocol: what each layer keeps after a chunk.

A rule looks at the per-layer caches (:class:`~hermes_policy.kv_store.KVStore`) and
returns, for each layer it wants to change, a :class:`LayerKeep`: the indices to keep
(system prefix included, in temporal order) and optionally one summary token to append.
Rules are small dataclasses holding only their configuration; the session applies their
decisions, re-indexes positions, and never asks a rule for anything at question time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..kv_store import KVStore

ReindexMode = Literal["eager", "lazy"]


@dataclass(frozen=True)
class SummaryToken:
    """One token appended after the kept tokens of a layer.

    key, value : Tensor ``(batch, kv_heads, 1, head_dim)``; key already rotated to ``position``
    position : LongTensor ``(axes, 1)``
    frame : frame index recorded for it (-1 when it summarises several frames)
    """

    key: torch.Tensor
    value: torch.Tensor
    position: torch.Tensor
    frame: int = -1


@dataclass(frozen=True)
class LayerKeep:
    """What one layer keeps: sorted indices into its current tokens (prefix included)."""

    indices: torch.Tensor
    summary: SummaryToken | None = None


@dataclass
class RetentionRule(ABC):
    """Base class of retention rules.

    Attributes
    ----------
    name : registry name (``full``, ``fifo``, ...)
    reindex : ``"eager"`` re-indexes positions after every compression; ``"lazy"`` only
        when positions approach the model's limit.
    """

    name: ClassVar[str]
    reindex: ReindexMode = "eager"

    @abstractmethod
    def select(self, store: KVStore) -> dict[int, LayerKeep]:
        """Decide what each over-budget layer keeps.

        Returns a mapping from layer index to :class:`LayerKeep`; layers that are left out
        keep everything.
        """

    def validate(self, tokens_per_frame: int) -> None:  # noqa: B027 - optional hook
        """Check the configuration against the model's frame size; raise RetentionError."""


def newest_indices(length: int, prefix_len: int, budget: int) -> torch.Tensor:
    """Indices of the prefix plus the newest ``budget`` stream tokens, in order."""
    start = max(prefix_len, length - budget)
    return torch.cat([torch.arange(prefix_len), torch.arange(start, length)])
