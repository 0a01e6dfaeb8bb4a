"""Qwen2.5-VL and Qwen3-VL (dynamic-resolution vision towers, 3D multimodal RoPE).

Both models see a chunk of frames as one "video" in the prompt, encoded by the model's
own video processor (``processor.video_processor``): frames are resized to multiples of
``patch_size * merge_size`` within the processor's pixel budget, paired into temporal
patches of ``temporal_patch_size`` (2) frames (an odd chunk is padded by repeating its last
frame, exactly as the processor does), and every temporal patch becomes
``(grid_h / merge) * (grid_w / merge)`` LLM tokens.

Token layout of one chunk, as the real processor plus the Qwen chat template (which
renders a video item as ``<|vision_start|><|video_pad|><|vision_end|>``) produce it:

- Qwen2.5-VL: ``<|vision_start|>`` + N x ``<|video_pad|>`` + ``<|vision_end|>``.
- Qwen3-VL: the processor expands the ``<|video_pad|>`` inside the template's
  ``<|vision_start|>...<|vision_end|>``, per temporal patch ``g``, into
  ``<{t_g:.1f} seconds><|vision_start|>`` + n x ``<|video_pad|>`` + ``<|vision_end|>``,
  where ``t_g`` is the mean of the timestamps of the first and last frame of the patch.
  Whether the template's outer ``<|vision_start|>...<|vision_end|>`` pair stays around the
  groups depends on the installed transformers: 5.10-5.2x processors replace only the pad
  token, so it stays (a chunk reads ``<|vision_start|><0.3 seconds><|vision_start|>...
  <|vision_end|>...<|vision_end|><|vision_end|>``); 4.x processors and 5.25 collapse the
  wrapper first, so a chunk is the groups alone. The adapter does not guess from version
  strings: :meth:`Qwen3VLAdapter.keeps_outer_wrapper` runs the installed processor once on
  a two-frame clip and reads which layout it produced (an unknown layout is refused with
  a :class:`ModelLoadError`). We reproduce that processor token for token; the chunk's text
  is tokenized in one call, as the processor does.

Positions (``position_axes = 3``: t, h, w; relative to the chunk's start):

- text tokens: all three axes equal, +1 per token;
- a vision block starting at ``s``: the model's own ``get_vision_position_ids``: t =
  ``s + floor(i * interval)`` for temporal patch ``i``, h = ``s + row``, w = ``s + col``
  (merged grid). Qwen2.5-VL's interval is ``tokens_per_second * second_per_grid_ts`` with
  ``second_per_grid_ts = temporal_patch_size / fps``; Qwen3-VL encodes time in the text
  timestamps instead and gives every temporal patch its own block (t = ``s``);
- text after a vision block continues at (max over all three axes of everything before)
  + 1. This is our decision for transformers issue 45381: 5.23's ``get_rope_index``
  restarts text at ``s + max(h, w) / merge``, which for a Qwen2.5-VL video whose largest
  temporal id passes its spatial extent puts the following text *below* the video's
  temporal ids. For Qwen3-VL (t = s in every block) the two rules coincide, so every
  position of a Qwen3-VL chunk equals ``get_rope_index``'s; for Qwen2.5-VL the vision
  positions are equal and only the text after a video differs (tests document both).

Frame rate and timestamps: the fps of a chunk is taken from its timestamps
(``(T - 1) / (t_last - t_first)``); without timestamps (or for a single frame) it is the
adapter's ``fps`` (constructor argument; default: the video processor's ``fps`` when it
has one, else 1 fps for Qwen2.5-VL and 2 fps for Qwen3-VL, the rates the paper samples
at). The processor is always given video metadata with that fps, so it never falls back
to its 24 fps default. Without timestamps a frame's time is ``frame_index / fps``.

``frame_index`` per token: video tokens of temporal patch ``g`` -> ``first_frame +
g * temporal_patch_size`` (the first frame of the pair, also for a padded last pair);
Qwen3-VL timestamp text -> the frame of the temporal patch it announces;
``<|vision_start|>`` / ``<|vision_end|>`` -> -1.

``model_inputs``: ``pixel_values_videos`` and ``video_grid_thw`` (one row per chunk, so
the default ``torch.cat`` along dim 0 merges chunks into the model's native multi-video
input). ``second_per_grid_ts`` and ``mm_token_type_ids`` are not passed: they only feed
the model's own position computation, and we always pass explicit positions. Qwen3-VL's
DeepStack features are computed by the base model's forward from ``pixel_values_videos``
and added to the hidden states of the chunk's own video tokens in the first decoder
layers, so streaming chunk by chunk is exact.

``tokens_per_frame``: one temporal patch is ``grid_h * grid_w / merge**2`` tokens; per
frame that divided by ``temporal_patch_size``, rounded half up. The grid depends on the
frame size (dynamic resolution): it is the last encoded chunk's grid, and before any
chunk the grid the processor's own resize rule gives a frame of ``frame_size``
(constructor argument, default 360 x 640) under its configured pixel budget.

Chat format: the processor's chat template (structured content: a video item, then the
question) is split around the video placeholder; the prefix and the suffix after the
question are those of a text-only turn, and the text between the video and the question
(empty for the Qwen templates) opens each question piece.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hermes_policy.cache.transfer import upload
from hermes_policy.errors import ModelLoadError, StreamError
from hermes_policy.models.base import ModelAdapter, StreamPiece

VIDEO_KEY = "pixel_values_videos"
GRID_KEY = "video_grid_thw"
# Reference frame for ``tokens_per_frame`` before any chunk was encoded and without a
# ``frame_size``: 640 x 360 (16:9 at 360p), given as (height, width).
DEFAULT_FRAME_SIZE = (360, 640)


def _check_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise StreamError(
            f"video frames must be a uint8 array (frames, height, width, 3), got {type(frames).__name__}"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise StreamError(
            "video frames must have shape (frames, height, width, 3) with RGB channels last, "
            f"got {tuple(frames.shape)}"
        )
    if frames.dtype != np.uint8:
        raise StreamError(f"video frames must be uint8 (0-255), got {frames.dtype}")
    return frames


def vision_position_ids(
    start: int, grid: tuple[int, int, int], merge_size: int, interval: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """3D positions ``(3, t * h * w / merge**2)`` of one vision block starting at ``start``.

    The formula of transformers' ``get_vision_position_ids`` (used when a model lacks it):
    t = ``start + floor(i * interval)`` per temporal patch ``i``; h, w = ``start +`` the
    row / column of the merged grid; tokens in (t, row, column) order.
    """
    t = (torch.arange(grid[0]) * interval).long() + start
    h = torch.arange(grid[1] // merge_size) + start
    w = torch.arange(grid[2] // merge_size) + start
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)


class _QwenVLAdapter(ModelAdapter):
    """Shared logic of the Qwen-VL adapters.

    Parameters
    ----------
    model, tokenizer, processor, name_or_path : as :class:`ModelAdapter`
    fps : frame rate assumed for chunks without usable timestamps (see module docstring)
    frame_size : (height, width) of the incoming frames, used for ``tokens_per_frame``
        before the first chunk is encoded (default: 360 x 640)
    """

    position_axes: ClassVar[int] = 3
    is_text_only: ClassVar[bool] = False
    default_fps: ClassVar[float] = 1.0

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        processor: Any = None,
        name_or_path: str = "",
        *,
        fps: float | None = None,
        frame_size: tuple[int, int] | None = None,
    ):
        super().__init__(model, tokenizer, processor, name_or_path)
        if getattr(processor, "video_processor", None) is None:
            raise ModelLoadError(
                f"{type(model).__name__} needs its processor with a video processor"
            )
        fps = fps or getattr(self.video_processor, "fps", None) or self.default_fps
        if not fps or fps <= 0:
            raise StreamError(f"fps must be positive, got {fps}")
        self.fps = float(fps)
        self.frame_size = tuple(frame_size) if frame_size is not None else None
        self._last_grid: tuple[int, int, int] | None = None
        self._grid_cache: dict[tuple[int, int], tuple[int, int, int]] = {}

    # -- structure -------------------------------------------------------------------
    @property
    def video_processor(self) -> Any:
        return self.processor.video_processor

    @property
    def vision_config(self) -> Any:
        return self.model.config.vision_config

    @property
    def merge_size(self) -> int:
        return int(self.vision_config.spatial_merge_size)

    @property
    def temporal_patch_size(self) -> int:
        return int(self.vision_config.temporal_patch_size)

    def _token_id(self, name: str) -> int:
        return int(getattr(self.model.config, name))

    @property
    def video_token_id(self) -> int:
        return self._token_id("video_token_id")

    @property
    def vision_start_id(self) -> int:
        return self._token_id("vision_start_token_id")

    @property
    def vision_end_id(self) -> int:
        return self._token_id("vision_end_token_id")

    def _token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id)

    @property
    def video_placeholder(self) -> str:
        """How the chat template renders one video item."""
        return (
            self._token(self.vision_start_id)
            + self._token(self.video_token_id)
            + self._token(self.vision_end_id)
        )

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens per frame: ``(grid_h / merge) * (grid_w / merge) / temporal_patch_size``.

        One temporal patch (``temporal_patch_size`` = 2 frames) becomes
        ``grid_h * grid_w / merge**2`` tokens; the per-frame figure is that divided by the
        temporal patch size, rounded half up (at least 1). Qwen resizes frames dynamically,
        so the grid depends on the frame size: it is the grid of the most recently encoded
        chunk; before any chunk, the grid the video processor gives a frame of
        ``frame_size`` (default 360 x 640) under its configured pixel budget.
        """
        grid = self._last_grid
        if grid is None:
            grid = self._grid_for(self.frame_size or DEFAULT_FRAME_SIZE)
        per_patch = grid[1] * grid[2] // self.merge_size**2
        return max(1, int(per_patch / self.temporal_patch_size + 0.5))

    def _grid_for(self, frame_size: tuple[int, int]) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid of one temporal patch of frames of ``frame_size``."""
        key = (int(frame_size[0]), int(frame_size[1]))
        if key not in self._grid_cache:
            frames = np.zeros((self.temporal_patch_size, *key, 3), dtype=np.uint8)
            out = self._run_processor(frames, self.fps)
            self._grid_cache[key] = tuple(int(x) for x in out[GRID_KEY][0])
        return self._grid_cache[key]

    # -- chat format -----------------------------------------------------------------
    @property
    def video_marker(self) -> str:
        return self.video_placeholder

    # -- stream input ----------------------------------------------------------------
    def _run_processor(self, frames: np.ndarray, fps: float) -> Any:
        """Run the model's own video processor on one clip with explicit metadata."""
        from transformers.video_utils import VideoMetadata

        n, height, width = frames.shape[:3]
        metadata = VideoMetadata(
            total_num_frames=n, fps=fps, width=width, height=height, frames_indices=list(range(n))
        )
        kwargs: dict[str, Any] = {}
        if hasattr(self.video_processor, "cap_pixels_per_frame") and (
            self.video_processor.cap_pixels_per_frame is None
        ):
            # Recent transformers warn unless this is set. Unset means False (the
            # uncapped per-frame resolution), which we keep: say so explicitly.
            kwargs["cap_pixels_per_frame"] = False
        out = self.video_processor(
            videos=[self.processor_video(frames)],
            video_metadata=[metadata],
            do_sample_frames=False,
            return_tensors="pt",
            **self.processor_device_kwargs(),
            **kwargs,
        )
        out[GRID_KEY] = out[GRID_KEY].cpu()  # read on the host (token counts, positions)
        return out

    def _chunk_fps(self, times: list[float]) -> float:
        """Frame rate of a chunk from its timestamps (mean spacing), else ``self.fps``."""
        if len(times) >= 2 and times[-1] > times[0]:
            return (len(times) - 1) / (times[-1] - times[0])
        return self.fps

    def _vision_positions(
        self, start: int, grid: tuple[int, int, int], interval: float | torch.Tensor
    ) -> torch.Tensor:
        """Positions ``(3, t * h * w / merge**2)`` of one vision block starting at ``start``.

        Our own copy of the model's ``get_vision_position_ids`` formula (tests check they
        agree): transformers 5.17's version multiplies a long ``arange`` by a float interval
        and then fails in ``meshgrid``, so calling it is not portable.
        """
        return vision_position_ids(start, grid, self.merge_size, interval)

    @abstractmethod
    def _blocks(
        self, grid: tuple[int, int, int], fps: float
    ) -> list[tuple[tuple[int, int, int], float | torch.Tensor]]:
        """The vision blocks of a chunk: (grid, temporal interval) each, in order."""

    @abstractmethod
    def _chunk_text(self, grid: tuple[int, int, int], times: list[float]) -> str:
        """The chunk's prompt text, with ``<|video_pad|>`` expanded as the processor does."""

    def frames_piece(
        self, frames: Any, first_frame: int, timestamps: list[float] | None = None
    ) -> StreamPiece:
        """Encode a chunk of frames with the model's video processor (see module docstring)."""
        frames = _check_frames(frames)
        n_frames = frames.shape[0]
        if timestamps is not None and len(timestamps) != n_frames:
            raise StreamError(f"{len(timestamps)} timestamps for {n_frames} frames")
        times = (
            [float(t) for t in timestamps]
            if timestamps is not None
            else [(first_frame + i) / self.fps for i in range(n_frames)]
        )
        fps = self._chunk_fps(times)
        tps = self.temporal_patch_size
        clip = frames
        if n_frames < tps:
            # Qwen3-VL's resize rejects clips shorter than a temporal patch; pad as the
            # processor's own patchify would (repeat the last frame).
            clip = np.concatenate([frames, np.repeat(frames[-1:], tps - n_frames, axis=0)])
        out = self._run_processor(clip, fps)
        pixels, grid_thw = out[VIDEO_KEY], out[GRID_KEY]
        grid = tuple(int(x) for x in grid_thw[0])
        if grid_thw.shape[0] != 1 or grid[0] != -(-n_frames // tps):
            raise StreamError(
                f"the video processor produced a grid {grid_thw.tolist()} for {n_frames} frames"
            )
        self._last_grid = grid
        padded_times = times + [times[-1]] * (-n_frames % tps)

        ids = torch.tensor(self.encode_text(self._chunk_text(grid, padded_times)), dtype=torch.long)
        positions = torch.empty(3, ids.shape[0], dtype=torch.long)
        frame_index = torch.full_like(ids, -1)
        per_patch = grid[1] * grid[2] // self.merge_size**2
        blocks = iter(self._blocks(grid, fps))
        group_of_block = 0  # temporal patch at which the next vision block starts
        current, i = 0, 0
        while i < ids.shape[0]:
            if int(ids[i]) != self.video_token_id:
                positions[:, i] = current
                current += 1
                i += 1
                continue
            block_grid, interval = next(blocks)
            block = self._vision_positions(current, block_grid, interval)
            n = block.shape[1]
            if not bool((ids[i : i + n] == self.video_token_id).all()):
                raise StreamError("the chunk's video tokens do not match the processor's grid")
            positions[:, i : i + n] = block
            groups = group_of_block + torch.arange(n) // per_patch
            frame_index[i : i + n] = first_frame + groups * tps
            group_of_block += block_grid[0]
            current = int(positions[:, : i + n].max()) + 1
            i += n
        if next(blocks, None) is not None:
            raise StreamError("the chunk's text holds fewer video blocks than the processor's grid")
        self._label_text_frames(ids, frame_index)
        return StreamPiece(
            input_ids=ids,
            positions=positions,
            frame_index=frame_index,
            model_inputs={VIDEO_KEY: pixels, GRID_KEY: grid_thw.long()},
        )

    def _label_text_frames(self, ids: torch.Tensor, frame_index: torch.Tensor) -> None:
        """Text inside a chunk other than the vision markers (Qwen3-VL's timestamps) gets
        the frame of the vision block it announces (the next one); markers stay -1."""
        markers = {self.vision_start_id, self.vision_end_id}
        next_frame = -1
        for i in range(ids.shape[0] - 1, -1, -1):
            token = int(ids[i])
            if token == self.video_token_id:
                next_frame = int(frame_index[i])
            elif token not in markers:
                frame_index[i] = next_frame


class Qwen2_5_VLAdapter(_QwenVLAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` (sectioned 3D M-RoPE)."""

    model_types = ("qwen2_5_vl",)
    default_fps = 1.0

    @property
    def tokens_per_second(self) -> float:
        return self.vision_config.tokens_per_second

    def second_per_grid_ts(self, fps: float) -> torch.Tensor:
        """Seconds per temporal patch, as the processor computes it (float32 tensor)."""
        return torch.tensor([self.temporal_patch_size / fps], dtype=torch.float32)[0]

    def _blocks(self, grid, fps):
        return [(grid, self.tokens_per_second * self.second_per_grid_ts(fps))]

    def _chunk_text(self, grid, times):
        n = grid[0] * grid[1] * grid[2] // self.merge_size**2
        return (
            self._token(self.vision_start_id)
            + self._token(self.video_token_id) * n
            + self._token(self.vision_end_id)
        )

    def input_embeddings(self, piece: StreamPiece) -> torch.Tensor | None:
        """Token embeddings with the chunk's video features in place of its video tokens.

        What the model's forward feeds its decoder stack (its forward scatters the same
        features after checking their count on the GPU, which waits for it; here the
        placeholders are found in the host-side ids), so a chunk's decoder pass can be
        replayed from a CUDA graph. Qwen3-VL has no such split: its DeepStack adds vision
        features inside the first decoder layers.
        """
        pixels, grid = piece.model_inputs.get(VIDEO_KEY), piece.model_inputs.get(GRID_KEY)
        if pixels is None and grid is None:
            return super().input_embeddings(piece)
        if set(piece.model_inputs) != {VIDEO_KEY, GRID_KEY} or not isinstance(pixels, torch.Tensor):
            return None
        device = self.device
        base = self.base_model
        embeds = base.get_input_embeddings()(upload(piece.input_ids, device)[None])
        out = base.get_video_features(upload(pixels, device), upload(grid, device))
        # an output object whose pooler_output holds them, or the features themselves;
        # one tensor, or one per video (transformers versions differ)
        features = out if isinstance(out, (torch.Tensor, tuple, list)) else getattr(out, "pooler_output", None)
        if isinstance(features, (tuple, list)) and all(isinstance(f, torch.Tensor) for f in features):
            features = torch.cat(list(features))
        if not isinstance(features, torch.Tensor):
            return None  # an unknown layout: the model's own forward runs (eagerly)
        slots = np.flatnonzero(piece.input_ids.numpy() == self.video_token_id)
        if len(slots) != features.shape[0]:
            raise StreamError(f"{len(slots)} video tokens but {features.shape[0]} video features")
        return embeds.index_copy(1, upload(torch.from_numpy(slots), device), features[None].to(embeds.dtype))


class Qwen3VLAdapter(_QwenVLAdapter):
    """Adapter for ``Qwen3VLForConditionalGeneration`` (interleaved 3D M-RoPE, DeepStack)."""

    model_types = ("qwen3_vl",)
    default_fps = 2.0

    @staticmethod
    def patch_timestamps(times: list[float], temporal_patch_size: int) -> list[float]:
        """Mean of the first and last frame time of each temporal patch (the processor's rule)."""
        return [
            (times[i] + times[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(times), temporal_patch_size)
        ]

    def _blocks(self, grid, fps):
        return [((1, grid[1], grid[2]), 1.0)] * grid[0]

    @functools.cached_property
    def keeps_outer_wrapper(self) -> bool:
        """Whether the installed processor keeps the chat template's outer vision pair.

        Feature detection rather than a version check: the processor expands one video
        placeholder for a clip of one temporal patch, and the token layout it returns is
        either ``start <t seconds> start pad... end end`` (kept) or ``<t seconds> start pad...
        end`` (collapsed). Anything else is a layout this adapter cannot reproduce exactly,
        so it is refused rather than streamed with wrong positions.
        """
        side = self.vision_config.patch_size * self.merge_size
        clip = np.zeros((self.temporal_patch_size, side, side, 3), dtype=np.uint8)
        from transformers.video_utils import VideoMetadata

        metadata = VideoMetadata(
            total_num_frames=len(clip), fps=self.fps, width=side, height=side,
            frames_indices=list(range(len(clip))),
        )
        out = self.processor(
            text=[self.video_placeholder], videos=[clip], video_metadata=[metadata],
            do_sample_frames=False, return_tensors="pt",
        )
        ids = [int(i) for i in out["input_ids"][0]]
        starts = ids.count(self.vision_start_id)
        pads = ids.count(self.video_token_id)
        grid = tuple(int(x) for x in out[GRID_KEY][0])
        expected_pads = grid[0] * grid[1] * grid[2] // self.merge_size**2
        if pads == expected_pads and starts == ids.count(self.vision_end_id):
            if starts == 2 and ids[0] == self.vision_start_id and ids[-1] == self.vision_end_id:
                return True
            if starts == 1 and ids[0] != self.vision_start_id and ids[-1] == self.vision_end_id:
                return False
        import transformers

        raise ModelLoadError(
            f"the Qwen3-VL processor of transformers {transformers.__version__} lays out a video "
            "in a way this adapter does not reproduce; verified: transformers 5.17-5.25 "
            "(see the README's 'Verified versions')"
        )

    def _chunk_text(self, grid, times):
        n = grid[1] * grid[2] // self.merge_size**2
        start, end, pad = (
            self._token(self.vision_start_id),
            self._token(self.vision_end_id),
            self._token(self.video_token_id),
        )
        groups = "".join(
            f"<{t:.1f} seconds>" + start + pad * n + end
            for t in self.patch_timestamps(times, self.temporal_patch_size)
        )
        return start + groups + end if self.keeps_outer_wrapper else groups
