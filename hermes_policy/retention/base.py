"""The retention protocol: what each layer keeps after a chunk.

A rule looks at the per-layer caches (:class:`~hermes_policy.cache.kv_store.KVStore`) and
returns, for each layer it wants to change, a :class:`LayerKeep`: the indices to keep
(system prefix included, in temporal order) and optionally one summary token to append.
Rules are small dataclasses holding only their configuration; the session applies their
decisions, re-indexes positions, and never asks a rule for anything at question time.

Per compression step the session calls, in order: :meth:`RetentionRule.needs_compression`
(cheap); :meth:`RetentionRule.guidance` (which pseudo-query prompts, if any, and which
layer needs which prompt's attention); one guidance forward when asked; then
:meth:`RetentionRule.select` with a :class:`SelectContext` holding that attention.

Two baselines work at question time instead (``window``: re-prefill the last frames;
``retrieval``: bring offloaded chunks back). Their rule stays a configuration dataclass;
the state they need between questions lives in a :class:`QuestionTimeMemory` that the
rule creates for each session (:meth:`RetentionRule.question_memory`), and that the
session calls at three points: after each prefilled chunk, before a question, after it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import RetentionError
from hermes_policy.models.base import ModelAdapter, StreamPiece

# "never": positions are kept as encoded (the question-time rules, whose offloaded or
# re-prefilled tokens must line up with the ones on the GPU); the stream must then stay
# within the model's position range
ReindexMode = Literal["eager", "lazy", "never"]


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

    def as_extra(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(key, value, position, frame)``, as :meth:`KVStore.keep` takes it."""
        return self.key, self.value, self.position, self.frame


@dataclass(frozen=True)
class LayerKeep:
    """What one layer keeps: sorted indices into its current tokens (prefix included).

    ``head_mask``: per-head retention: BoolTensor ``(kv_heads, len(indices))``, which kept
    token each KV head may attend (the summary token, if any, is seen by every head);
    None: the layer's mask, if it has one, follows its kept tokens.
    """

    indices: torch.Tensor
    summary: SummaryToken | None = None
    head_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class GuidanceRequest:
    """Pseudo-queries a rule wants run on the cache before it selects.

    prompts : the prompt texts (run together in one forward, each seeing only the cache
        and itself)
    layer_prompt : per layer, the index of the prompt whose attention it needs, or None
    """

    prompts: tuple[str, ...]
    layer_prompt: tuple[int | None, ...]


@dataclass
class SelectContext:
    """What a rule may use besides the store.

    attention : per layer, the pseudo-query attention over that layer's stream tokens
        ``(stream_len,)`` (mean over heads and prompt tokens), or None
    rotary_emb : the model's rotary module (to move keys, e.g. for summary tokens)
    """

    attention: list[torch.Tensor | None] | None = None
    rotary_emb: nn.Module | None = None


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

    def budget_of(self, layer: int) -> int | None:
        """Stream tokens ``layer`` may keep (None: unbounded)."""
        return None

    def needs_compression(self, store: KVStore, upcoming: int = 0) -> bool:
        """True when some layer holds (after ``upcoming`` more tokens) more stream tokens than its budget."""
        for layer, held in enumerate(store.stream_lengths()):
            budget = self.budget_of(layer)
            if budget is not None and held + upcoming > budget:
                return True
        return False

    def guidance(self, store: KVStore, history: list[tuple[str, str]]) -> GuidanceRequest | None:
        """The pseudo-queries this rule needs for the next selection (None: none).

        ``history`` holds the (question, answer) pairs asked so far, oldest first. The
        request must not depend on the tokens of the chunk being ingested: the session
        may ask for it before that chunk's prefill, to run both in one forward.
        """
        return None

    @abstractmethod
    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        """Decide what each over-budget layer keeps.

        Returns a mapping from layer index to :class:`LayerKeep`; layers that are left out
        keep everything.
        """

    def validate(self, adapter: ModelAdapter) -> None:  # noqa: B027 - optional hook
        """Check the configuration against the model (frame size, shape); raise a HermesError."""

    def question_memory(self, adapter: ModelAdapter, chunk_frames: int) -> QuestionTimeMemory | None:
        """The per-session state of a rule that works at question time (None: none)."""
        return None


class QuestionTimeMemory(ABC):
    """Per-session state of a rule that assembles the cache when a question arrives.

    The session calls :meth:`buffer_frames` instead of prefilling frames when
    :attr:`buffers_frames` is set; otherwise :meth:`after_chunk` after each prefilled
    chunk (before the rule's eviction). :meth:`before_question` runs once the question's
    pending frames are in, before the question is prefilled (its cost is part of the time
    to first token); :meth:`after_question` once the answer is done.
    """

    buffers_frames: ClassVar[bool] = False
    # what before_question assembles depends on the question (so questions cannot share it)
    per_question: ClassVar[bool] = False

    def buffer_frames(self, frames: list, times: list[float | None], first_frame: int) -> None:  # noqa: B027
        """Keep frames (not prefilled) for the next question."""
        raise TypeError(f"{type(self).__name__} prefills its frames; it does not buffer them")

    def after_chunk(self, store: KVStore, new_tokens: int) -> None:  # noqa: B027 - optional hook
        """See a chunk of ``new_tokens`` tokens just appended to every layer of ``store``."""

    @abstractmethod
    def before_question(self, session: Any, question: StreamPiece) -> None:
        """Assemble the cache the question will see (``session``: the StreamingSession)."""

    def after_question(self, session: Any) -> None:  # noqa: B027 - optional hook
        """Undo what :meth:`before_question` added that must not outlive the answer."""

    def nbytes(self) -> int:
        """Bytes this memory holds outside the GPU cache (host copies, buffered frames)."""
        return 0


@dataclass
class BudgetedRule(RetentionRule):
    """A rule with one budget of stream tokens for every layer."""

    budget: int = 6000

    def budget_of(self, layer: int) -> int:
        return self.budget

    def validate(self, adapter: ModelAdapter) -> None:
        if self.budget < adapter.tokens_per_frame:
            raise RetentionError(
                f"budget of {self.budget} tokens is smaller than one frame ({adapter.tokens_per_frame} tokens)"
            )


def keep_newest(store: KVStore, budget: int) -> dict[int, LayerKeep]:
    """Per over-budget layer, the prefix plus its newest ``budget`` stream tokens."""
    return {
        layer: LayerKeep(newest_indices(length, store.prefix_len, budget))
        for layer, length in enumerate(store.lengths())
        if length - store.prefix_len > budget
    }


def newest_indices(length: int, prefix_len: int, budget: int) -> torch.Tensor:
    """Indices of the prefix plus the newest ``budget`` stream tokens, in order."""
    start = max(prefix_len, length - budget)
    return torch.cat([torch.arange(prefix_len), torch.arange(start, length)])
