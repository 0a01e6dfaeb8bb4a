"""One-shot reference forwards: the ground truth streaming results are compared against.

A stream is a sequence of pieces (system prefix, frame chunks, question). Streaming
prefills them one by one on a KV store; the reference concatenates them, placing each
piece right after the previous one (at ``max position + 1``), and runs a single forward
with no cache. With unlimited retention both must give the same logits.
"""

from __future__ import annotations

import torch

from hermes_policy.models.base import ModelAdapter, StreamPiece


def concat_pieces(adapter: ModelAdapter, pieces: list[StreamPiece]) -> tuple[StreamPiece, torch.Tensor]:
    """Concatenate pieces as streaming would place them.

    Returns
    -------
    piece : the concatenated piece (positions relative to 0)
    positions : LongTensor ``(axes, total)``, the absolute positions
    """
    positions, start = [], 0
    for piece in pieces:
        positions.append(piece.positions + start)
        start = int(positions[-1].max()) + 1 if piece.positions.numel() else start
    merged = StreamPiece(
        input_ids=torch.cat([p.input_ids for p in pieces]),
        positions=torch.cat(positions, dim=1),
        frame_index=torch.cat([p.frame_index for p in pieces]),
        model_inputs=adapter.concat_model_inputs([p.model_inputs for p in pieces if p.model_inputs]),
    )
    return merged, merged.positions


@torch.inference_mode()
def one_shot_logits(adapter: ModelAdapter, pieces: list[StreamPiece]) -> torch.Tensor:
    """Logits ``(1, total, vocab)`` of one cache-free forward over all pieces."""
    merged, positions = concat_pieces(adapter, pieces)
    hidden = adapter.forward(merged, positions, cache=None)
    return adapter.logits(hidden)
