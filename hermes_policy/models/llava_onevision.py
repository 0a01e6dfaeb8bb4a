"""LLaVA-OneVision (SigLIP vision tower, Qwen2 language model, 1D RoPE).

Token layout of one chunk, as the model's own processor and forward build it for a video:
``T * tokens_per_frame`` video features (each frame: SigLIP patches, projected, pooled
2x2 by bilinear interpolation with ceil, e.g. 27x27 -> 14x14 = 196 for the 384px/14
checkpoints) followed by ONE ``image_newline`` embedding per video (transformers 5.23
appends it in ``get_video_features``, 5.17 in the model's forward). The processor expands one
``<video>`` placeholder into ``T * tokens_per_frame + 1`` video tokens and puts nothing
else around them. A chunk is therefore one "video" to the model: a stream of C chunks
holds C newline tokens, one after each chunk (the one-shot reference passes the chunks
as C separate videos, so it holds exactly the same tokens).

Decisions:

- The per-chunk newline token is extra: ``tokens_per_frame`` counts only the pooled frame
  features; a chunk of T frames is ``T * tokens_per_frame + 1`` tokens.
- Its ``frame_index`` is -1: it carries no pixels of any frame (it is a learned constant
  embedding), so ``frame_index >= 0`` selects exactly ``tokens_per_frame`` tokens per
  frame, which keeps per-frame analyses (anchor tokens, periodicity) exact. It is still a
  stream token (after the system prefix) and retention rules treat it like any other.
- Positions are plain ``arange`` (1D RoPE, ``position_axes = 1``); timestamps are not
  used by this model.
- Chat format: the processor's chat template (structured content: a ``{"type": "video"}``
  part then the text) is split around the ``<video>`` placeholder; the text between the
  placeholder and the question (``"\\n"`` in the LLaVA-OV-Qwen2 template) opens every
  question piece. Without a processor template the tokenizer's ChatML template is used
  as in the base class.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hermes_policy.attention.context import AttentionContext, attention_kwargs
from hermes_policy.cache.positions import to_model_position_ids
from hermes_policy.cache.transfer import upload
from hermes_policy.errors import StreamError
from hermes_policy.models.base import ModelAdapter, StreamPiece, cache_kwargs
from hermes_policy.models.pooling import bilinear_pool

VIDEO_KEY = "pixel_values_videos"


class LlavaOnevisionAdapter(ModelAdapter):
    """Adapter for ``LlavaOnevisionForConditionalGeneration``."""

    model_types = ("llava_onevision",)
    position_axes = 1
    is_text_only = False

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, name_or_path: str = ""):
        super().__init__(model, tokenizer, processor, name_or_path)
        use_matmul_pooling(self.base_model)
        contiguous_vision_embeddings(self.base_model)

    # -- structure -------------------------------------------------------------------
    @property
    def vision_config(self) -> Any:
        return self.model.config.vision_config

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def video_token(self) -> str:
        token = getattr(self.processor, "video_token", None)
        return token or self.tokenizer.convert_ids_to_tokens(self.video_token_id)

    @property
    def patches_per_side(self) -> int:
        """SigLIP patches along one side of a frame (``image_size // patch_size``)."""
        return int(self.vision_config.image_size) // int(self.vision_config.patch_size)

    @property
    def tokens_per_frame(self) -> int:
        """Pooled features per frame: ``ceil(n / 2) ** 2`` for ``n`` patches a side.

        The model pools each frame's ``n x n`` patch grid to ``ceil(n/2) x ceil(n/2)``
        (bilinear). The newline token appended once per chunk is not counted here.
        """
        side = math.ceil(self.patches_per_side / 2)
        return side * side

    def chunk_tokens(self, frames: int) -> int:
        """Tokens of a chunk of ``frames`` frames: the frames' features plus one newline."""
        return frames * self.tokens_per_frame + 1

    # -- chat format -----------------------------------------------------------------
    @property
    def video_marker(self) -> str:
        return self.video_token

    # -- stream input ----------------------------------------------------------------
    @staticmethod
    def _check_frames(frames: Any) -> np.ndarray:
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
        if not isinstance(frames, np.ndarray):
            raise StreamError(
                f"video frames must be a uint8 array (frames, height, width, 3), got {type(frames).__name__}"
            )
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise StreamError(
                f"video frames must have shape (frames, height, width, 3) with RGB channels last, "
                f"got {tuple(frames.shape)}"
            )
        if frames.dtype != np.uint8:
            raise StreamError(f"video frames must be uint8 (0-255), got {frames.dtype}")
        return frames

    def frames_piece(
        self, frames: Any, first_frame: int, timestamps: list[float] | None = None
    ) -> StreamPiece:
        """Encode a chunk with the model's own video processor.

        Returns ``T * tokens_per_frame + 1`` ``<video>`` tokens (the last is the chunk's
        newline, ``frame_index`` -1) with ``pixel_values_videos`` of shape ``(1, T, C, H, W)``.
        """
        frames = self._check_frames(frames)
        video_processor = getattr(self.processor, "video_processor", None)
        if video_processor is None:
            raise StreamError("this LLaVA-OneVision checkpoint has no video processor")
        pixels = video_processor(
            videos=[self.processor_video(frames)], return_tensors="pt", **self.processor_device_kwargs()
        )[VIDEO_KEY]
        n_frames = frames.shape[0]
        size = int(self.vision_config.image_size)
        if (
            pixels.ndim != 5
            or pixels.shape[:2] != (1, n_frames)
            or tuple(pixels.shape[-2:]) != (size, size)
        ):
            raise StreamError(
                f"the video processor produced {tuple(pixels.shape)}; the vision tower expects "
                f"(1, {n_frames}, 3, {size}, {size})"
            )
        n_tokens = self.chunk_tokens(n_frames)
        input_ids = torch.full((n_tokens,), self.video_token_id, dtype=torch.long)
        frame_index = torch.cat(
            [
                torch.arange(first_frame, first_frame + n_frames).repeat_interleave(
                    self.tokens_per_frame
                ),
                torch.tensor([-1]),
            ]
        )
        return StreamPiece(
            input_ids=input_ids,
            positions=torch.arange(n_tokens)[None],
            frame_index=frame_index,
            model_inputs={VIDEO_KEY: pixels.to(self.dtype)},
        )

    def concat_model_inputs(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Merge chunks as separate videos (each gets its own newline in the model).

        Chunks of equal length are concatenated along dim 0 into one
        ``(chunks, T, C, H, W)`` tensor, the model's native batch of videos. Chunks of
        different lengths (a shorter flushed chunk) cannot share one tensor; they are kept
        as a list of ``(1, T_i, C, H, W)`` tensors, which :meth:`forward` encodes one by one.
        """
        videos: list[torch.Tensor] = []
        for d in inputs:
            value = d.get(VIDEO_KEY)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                videos.extend(value.split(1, dim=0))
            else:
                videos.extend(value)
        if not videos:
            return {}
        if all(v.shape == videos[0].shape for v in videos):
            return {VIDEO_KEY: torch.cat(videos, dim=0)}
        return {VIDEO_KEY: videos}

    # -- running ---------------------------------------------------------------------
    def video_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features ``(videos * (T * tokens_per_frame + 1), hidden)`` of ``(videos, T, C, H, W)``.

        Each video's features end with the model's ``image_newline``, as in its forward:
        transformers 5.23 appends it inside ``get_video_features``, 5.17 in ``forward``
        (after ``get_video_features``), so it is added here when missing.
        """
        config = self.model.config
        n_videos, n_frames = pixels.shape[:2]
        # Positional: the argument is ``pixel_values`` in transformers 5.17, later renamed.
        out = self.base_model.get_video_features(
            pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features), dim=0)
        features = features.reshape(n_videos, -1, features.shape[-1])
        if features.shape[1] == n_frames * self.tokens_per_frame:
            newline = self.base_model.image_newline.to(features)
            features = torch.cat([features, newline.expand(n_videos, 1, -1)], dim=1)
        if features.shape[1] != self.chunk_tokens(n_frames):
            raise StreamError(
                f"the model made {features.shape[1]} features for a video of {n_frames} frames; "
                f"expected {self.chunk_tokens(n_frames)} ({self.tokens_per_frame} per frame + 1 newline)"
            )
        return features.reshape(-1, features.shape[-1])

    def embedding_graph_inputs(self, piece: StreamPiece) -> dict[str, torch.Tensor] | None:
        """The ids, the chunk's pixels and the slots of its ``<video>`` tokens (found in the
        host-side ids: the model's forward finds them after checking their count on the GPU,
        which waits for it), so the vision tower can run inside an ingest graph."""
        pixels = piece.model_inputs.get(VIDEO_KEY)
        if pixels is None:
            return super().embedding_graph_inputs(piece)
        if not isinstance(pixels, torch.Tensor) or set(piece.model_inputs) != {VIDEO_KEY}:
            return None
        slots = np.flatnonzero(piece.input_ids.numpy() == self.video_token_id)
        n_videos, n_frames = pixels.shape[:2]
        expected = n_videos * self.chunk_tokens(n_frames)
        if len(slots) != expected:
            raise StreamError(f"{len(slots)} video tokens but {expected} video features")
        return {"input_ids": piece.input_ids[None], "pixels": pixels, "slots": torch.from_numpy(slots)}

    def embeddings_from_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the video features (vision tower, pooling, projector,
        newline) in place of the ``<video>`` tokens."""
        embeds = self.base_model.get_input_embeddings()(inputs["input_ids"])
        if "pixels" not in inputs:
            return embeds
        features = self.video_features(inputs["pixels"])
        return embeds.index_copy(1, inputs["slots"], features[None].to(embeds.dtype))

    def forward(
        self,
        piece: StreamPiece,
        positions: torch.Tensor,
        cache: Any | None = None,
        attention: AttentionContext | None = None,
    ) -> torch.Tensor:
        videos = piece.model_inputs.get(VIDEO_KEY)
        if not isinstance(videos, (list, tuple)):
            return super().forward(piece, positions, cache, attention)
        # Videos of different lengths: encode each, scatter into the placeholders.
        device = self.device
        input_ids = upload(piece.input_ids, device)[None]
        embeds = self.base_model.get_input_embeddings()(input_ids)
        features = torch.cat([self.video_features(v.to(device)) for v in videos]).to(embeds.dtype)
        mask = input_ids == self.video_token_id
        if int(mask.sum()) != features.shape[0]:
            raise StreamError(
                f"{int(mask.sum())} video tokens but {features.shape[0]} video features"
            )
        embeds = embeds.masked_scatter(mask[..., None], features)
        out = self.base_model(
            inputs_embeds=embeds,
            position_ids=to_model_position_ids(upload(positions, device)),
            **cache_kwargs(self.base_model, cache),
            **attention_kwargs(attention),
        )
        return out.last_hidden_state


def use_matmul_pooling(base_model: Any) -> None:
    """Make the model pool frame features with :func:`~.pooling.bilinear_pool`.

    The same bilinear 2x pooling as the model's ``apply_pooling`` (equal up to float
    rounding), as one float32 matmul instead of the slow bf16 interpolation kernel. Set on
    this model instance only.
    """
    if not hasattr(base_model, "apply_pooling"):
        return
    vision = base_model.config.vision_config
    side = vision.image_size // vision.patch_size

    def apply_pooling(image_features: torch.Tensor) -> torch.Tensor:
        return bilinear_pool(image_features, side, side)

    base_model.apply_pooling = apply_pooling


def _contiguous_output(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def contiguous_vision_embeddings(base_model: Any) -> None:
    """Make the vision tower's patch embeddings row-major (one copy a forward).

    SigLIP's embedding step returns ``conv(pixels).flatten(2).transpose(1, 2)``: a
    ``(frames, patches, hidden)`` tensor laid out hidden-major. Each encoder layer's
    residual add keeps the layout of its first operand, so the whole residual stream
    stays transposed: every add reads across strides and every layer norm first copies
    its input (``benchmarks/profile_efficiency.py --diagnose`` shows the cost;
    docs/performance.md). Set on this model instance only;
    the values do not change.
    """
    tower = getattr(base_model, "vision_tower", None)
    if tower is None:
        return
    for module in tower.modules():
        if type(module).__name__.endswith("VisionEmbeddings") and not getattr(module, "_hermes_contiguous", False):
            module.register_forward_hook(_contiguous_output)
            module._hermes_contiguous = True
