"""HERMES's pseudo-queries as one forward: the prompts a rule asks for, laid out as query
blocks behind an optional chunk of frames, with the capture that collects each layer's
attention over its stream.

The session runs the forward this module plans (:meth:`GuidancePlanner.plan`) and hands
the collected attention to the rule's :meth:`~hermes_policy.retention.base.RetentionRule.select`.
Each prompt is a block that sees the cache (and the chunk) and, causally, itself only, at
the layer's next free position, exactly as if it had been asked alone; the rows captured
at a layer are that layer's prompt, weighed ``1 / n`` over its ``n`` real tokens and 0 over
its padding, and averaged over heads inside the attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hermes_policy.attention.capture import AttentionCapture
from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.masks import block_rows_needed
from hermes_policy.cache.transfer import upload
from hermes_policy.models.base import ModelAdapter, StreamPiece
from hermes_policy.retention.base import GuidanceRequest

# pseudo-query prompts are padded to a multiple of this many tokens: a question changes a
# compressing chunk's graph shape only when a prompt crosses a multiple (one capture, then
# replays), while every padding row runs through the layers on every compressing chunk
# (at 16, ~12% of the prompts' rows after a question were padding; at 8, ~6%)
PROMPT_QUANTUM = 8
MAX_CACHED_PROMPTS = 8  # tokenised prompts kept (those of the last few questions)


@dataclass(frozen=True)
class GuidanceLayout:
    """The shape of a pseudo-query pass (what its cost scales with).

    Attributes
    ----------
    lead : rows prefilled before the prompts in the same forward (a chunk: fused guidance)
    prompt_tokens : each prompt's own tokens
    prompt_rows : each prompt's rows, padding included (``PROMPT_QUANTUM``)
    captured : ``(layer, start, stop)`` of the rows captured at each layer that captures
        (the forward's graph key holds the same)
    layers : decoder layers of the forward
    """

    lead: int
    prompt_tokens: tuple[int, ...]
    prompt_rows: tuple[int, ...]
    captured: tuple[tuple[int, int, int], ...]
    layers: int

    @property
    def layer_rows(self) -> tuple[int, ...]:
        """Per layer, the rows an ingest forward computes there: the lead plus the blocks
        still read at that layer or later (:func:`~hermes_policy.attention.masks.block_rows_needed`).
        Derived when read, not on every compressing chunk."""
        picked = [range(0)] * self.layers
        for layer, start, stop in self.captured:
            picked[layer] = range(start, stop)
        return tuple(block_rows_needed(self.lead, list(self.prompt_rows), picked))

    @property
    def row_share(self) -> float:
        """The prompts' share of the rows through the decoder layers: the share of the
        forward's linear-layer arithmetic they take when every row costs the same."""
        rows = self.layer_rows
        total = sum(rows)
        return (total - self.lead * len(rows)) / total if total else 0.0


def pad_piece(piece: StreamPiece, quantum: int) -> StreamPiece:
    """``piece`` followed by copies of its last token, to a multiple of ``quantum`` tokens.

    The padding continues the positions (every axis one past the piece's largest) and
    belongs to no frame; prefilled causally after the piece, it changes nothing the
    piece's own tokens compute.
    """
    n = len(piece)
    extra = -(-n // quantum) * quantum - n
    if extra == 0 or n == 0:
        return piece
    start = piece.extent
    ids, positions, frames = piece.input_ids.numpy(), piece.positions.numpy(), piece.frame_index.numpy()
    padding = np.broadcast_to(np.arange(start, start + extra, dtype=positions.dtype), (positions.shape[0], extra))
    # numpy: each small torch operation on the CPU has a fixed cost, paid on every compressing chunk
    return StreamPiece(
        input_ids=torch.from_numpy(np.concatenate([ids, np.repeat(ids[-1:], extra)])),
        positions=torch.from_numpy(np.concatenate([positions, padding], axis=1)),
        frame_index=torch.from_numpy(np.concatenate([frames, np.full(extra, -1, dtype=frames.dtype)])),
        model_inputs=piece.model_inputs,
    )


@dataclass
class GuidancePass:
    """One planned pseudo-query forward.

    Attributes
    ----------
    piece : the lead (if any) and the padded prompts, joined
    attention : its attention context (the prompts as query blocks, the capture)
    attention_by_layer : what the capture fills: per layer, FloatTensor ``(stream_len,)``
        on the model's device (the lead included), or None where no prompt was requested
    lengths : every layer's length after the lead, what the store is cut back to afterwards
    layout : the pass's shape
    """

    piece: StreamPiece
    attention: AttentionContext
    attention_by_layer: list[torch.Tensor | None]
    lengths: list[int]
    layout: GuidanceLayout


@dataclass
class GuidancePlanner:
    """Plans pseudo-query passes for one session; keeps what recurs between them (the
    tokenised prompts, the row-weight tensors a CUDA graph reads)."""

    adapter: ModelAdapter
    quantum: int = PROMPT_QUANTUM
    _pieces: dict[str, StreamPiece] = field(default_factory=dict)
    _row_weights: dict[tuple[int, int], tuple[torch.Tensor, int]] = field(default_factory=dict)

    def prompt_piece(self, prompt: str) -> StreamPiece:
        """A prompt as a piece, tokenised once: the prompts change only with the
        conversation, and every compressing chunk asks for them."""
        cached = self._pieces.get(prompt)
        if cached is None:
            if len(self._pieces) >= MAX_CACHED_PROMPTS:  # the prompts of earlier questions
                self._pieces.clear()
            cached = self._pieces[prompt] = self.adapter.question_piece(prompt)
        return cached

    def plan(
        self,
        request: GuidanceRequest,
        lengths: list[int],
        prefix_len: int,
        lead: StreamPiece | None = None,
        prompt_pieces: list[StreamPiece] | None = None,
    ) -> GuidancePass:
        """The forward of ``request``'s prompts on a store of ``lengths`` per layer (its
        first ``prefix_len`` tokens the system prefix), behind ``lead`` when given."""
        pieces = prompt_pieces or [self.prompt_piece(p) for p in request.prompts]
        # padded: a forward's shape then changes only when a prompt crosses a multiple (its
        # CUDA graph is reused across questions); the padding comes after the prompt's
        # tokens, which do not see it
        real_lengths = [len(p) for p in pieces]
        pieces = [pad_piece(p, self.quantum) for p in pieces]
        lead_len = len(lead) if lead is not None else 0
        starts = [lead_len]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        shift = lead.extent if lead is not None else 0  # prompts start where the lead ends
        parts = ([lead] if lead is not None else []) + pieces
        # joined in numpy (the host's work here is on every compressing chunk's path)
        merged = StreamPiece(
            input_ids=torch.from_numpy(np.concatenate([p.input_ids.numpy() for p in parts])),
            positions=torch.from_numpy(
                np.concatenate([p.positions.numpy() + (shift if p is not lead else 0) for p in parts], axis=1)
            ),
            frame_index=torch.from_numpy(np.concatenate([p.frame_index.numpy() for p in parts])),
            model_inputs=lead.model_inputs if lead is not None else {},
        )
        # each layer's whole padded prompt block: the rows are part of a CUDA graph's shape
        rows = {
            layer: slice(starts[idx], starts[idx + 1])
            for layer, idx in enumerate(request.layer_prompt)
            if idx is not None
        }
        result: list[torch.Tensor | None] = [None] * len(lengths)
        after_lead = [n + lead_len for n in lengths]
        weights = [self._row_weights_of(idx, real, len(piece)) for idx, (real, piece) in enumerate(zip(real_lengths, pieces, strict=True))]

        def keep_stream(layer: int, probs: torch.Tensor) -> None:
            # (stream,): the mean over heads and the prompt's tokens; stays on the device
            result[layer] = probs[0, 0, 0, prefix_len : after_lead[layer]].float()

        capture = AttentionCapture(
            self.adapter.attention_modules,
            query_rows=rows,
            callback=keep_stream,
            head_mean=True,
            row_weights={layer: weights[idx] for layer, idx in enumerate(request.layer_prompt) if idx is not None},
        )
        sizes = tuple(len(p) for p in pieces)
        captured = tuple(sorted((k, v.start, v.stop) for k, v in rows.items()))
        layout = GuidanceLayout(lead_len, tuple(real_lengths), sizes, captured, len(result))
        attention = AttentionContext(capture=capture, blocks=(lead_len, sizes))
        return GuidancePass(merged, attention, result, after_lead, layout)

    def _row_weights_of(self, index: int, real: int, padded: int) -> torch.Tensor:
        """Weights ``(padded,)`` of prompt ``index``'s rows: ``1 / real`` for its tokens, 0
        for its padding. One device tensor per prompt and padded length, refilled (queued
        before the forward) only when the prompt's length changes: a CUDA graph captured
        with it reads the values of the replay's own prompts."""
        key = (index, padded)
        held, held_real = self._row_weights.get(key, (None, None))
        if held_real == real:
            return held
        values = np.zeros(padded, dtype=np.float32)
        values[:real] = 1.0 / real
        with torch.inference_mode():  # made and refilled as an inference tensor, wherever called from
            if held is None:
                held = torch.empty(padded, dtype=torch.float32, device=self.adapter.device)
            held.copy_(upload(torch.from_numpy(values), held.device))
        self._row_weights[key] = (held, real)
        return held
