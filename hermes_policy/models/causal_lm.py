"""Plain causal LMs (Llama / Qwen2 / Qwen3 / Mistral families, including GGUF files).

They have no vision tower: a "frame" is a fixed-length chunk of ``tokens_per_frame`` text
tokens (a scene description), so a text stream exercises exactly the same streaming,
retention and probing machinery as a video stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hermes_policy.errors import StreamError
from hermes_policy.models.base import ModelAdapter, StreamPiece

DEFAULT_TOKENS_PER_FRAME = 48


class CausalLMAdapter(ModelAdapter):
    """Adapter for text-only decoders whose frames are ``tokens_per_frame`` tokens long."""

    model_types = ("llama", "qwen2", "qwen3", "mistral")
    position_axes = 1
    is_text_only = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        processor: Any = None,
        name_or_path: str = "",
        tokens_per_frame: int = DEFAULT_TOKENS_PER_FRAME,
    ):
        super().__init__(model, tokenizer, processor, name_or_path)
        if tokens_per_frame < 1:
            raise StreamError(f"tokens per frame must be at least 1, got {tokens_per_frame}")
        self._tokens_per_frame = int(tokens_per_frame)
        pad = self.encode_text(" ")
        self._pad_id = pad[-1] if pad else int(tokenizer.eos_token_id or 0)

    @property
    def tokens_per_frame(self) -> int:
        return self._tokens_per_frame

    def frame_ids(self, text: str) -> list[int]:
        """Token ids of one text frame, cut or padded (with spaces) to exactly N tokens."""
        ids = self.encode_text(text)[: self._tokens_per_frame]
        return ids + [self._pad_id] * (self._tokens_per_frame - len(ids))

    def frames_piece(
        self,
        frames: Sequence[str] | torch.Tensor,
        first_frame: int,
        timestamps: list[float] | None = None,
    ) -> StreamPiece:
        if isinstance(frames, torch.Tensor):
            if frames.ndim != 2 or frames.shape[1] != self._tokens_per_frame:
                raise StreamError(
                    f"text frames must be token ids of shape (frames, {self._tokens_per_frame}), "
                    f"got {tuple(frames.shape)}"
                )
            ids = frames.long()
        else:
            if isinstance(frames, str) or not all(isinstance(f, str) for f in frames):
                raise StreamError("a text-only model takes text frames: a list of strings")
            ids = torch.tensor([self.frame_ids(f) for f in frames], dtype=torch.long)
        n_frames = ids.shape[0]
        piece = StreamPiece.text(ids.reshape(-1), self.position_axes)
        piece.frame_index = torch.arange(first_frame, first_frame + n_frames).repeat_interleave(
            self._tokens_per_frame
        )
        return piece
