"""Video input: a video file or a folder of frame images, sampled at a rate, as RGB frames.

The decoders (PyAV, else OpenCV; frame folders) are in
:mod:`hermes_policy.inputs.video_decoders`; writing a video is
:func:`hermes_policy.inputs.video_writing.write_video`.

Timestamps
    Every source is put on one clock: seconds since the first decoded frame. Video files use
    the container's presentation times (the OpenCV fallback reads them through
    ``CAP_PROP_POS_MSEC``, or counts frames at the nominal rate when that is unusable); a
    frame folder puts frame ``i`` at ``i / folder_fps``.

Sampling rule (``fps`` given)
    The target times are the multiples ``k / fps`` (``k = 0, 1, 2, ...``) that lie in
    ``[start, end)`` and before the end of the last frame (its timestamp plus one source
    frame period). For each target time the decoded frame of the window ``[start, end)``
    whose timestamp is nearest is taken; on a tie the earlier frame wins. Returned
    timestamps are those of the chosen frames, not the target times. When ``fps`` exceeds
    the source rate a frame can be nearest to several targets and is then repeated, so the
    output keeps the requested rate in real time. With ``fps=None`` every frame of the
    window is kept.

``max_frames`` keeps the first ``max_frames`` selected frames and stops decoding there (a
stream is read front to back; it is not spread uniformly over the video).

Orientation metadata (phone videos) is ignored by both decoders, so they agree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hermes_policy.errors import VideoInputError
from hermes_policy.inputs.video_decoders import Loader, open_source

# Float timestamps from pts * time_base and targets k / fps differ by rounding only; this
# slack makes "at or after" and tie decisions identical across decoders.
_EPS = 1e-6


@dataclass
class VideoFrames:
    """Decoded frames of one video (or one chunk of it).

    Attributes
    ----------
    frames : np.ndarray
        ``(T, H, W, 3)`` uint8 RGB frames.
    timestamps : np.ndarray
        ``(T,)`` float64 seconds since the first frame of the source, increasing (equal
        values only where a frame is repeated because ``fps`` exceeds the source rate).
    source_fps : float
        Nominal frame rate of the source (``folder_fps`` for a folder; 0.0 if unknown).
    path : str
        The file or folder the frames came from.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    source_fps: float
    path: str

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_frames(self) -> int:
        """Number of frames ``T``."""
        return len(self)


def select_frames(
    frames: Iterator[tuple[float, Loader]] | Iterator[tuple[float, Any]],
    fps: float | None,
    start: float,
    end: float,
    source_fps: float,
) -> Iterator[tuple[float, Any]]:
    """Apply the module's sampling rule to a stream of ``(timestamp, item)`` pairs.

    Parameters
    ----------
    frames
        ``(timestamp, item)`` pairs with strictly increasing timestamps.
    fps
        Target rate, or None to keep every frame of the window.
    start, end
        The window ``[start, end)`` in seconds (``end`` may be ``inf``).
    source_fps
        Nominal source rate; one period past the last frame still shows that frame. When
        0 the last observed frame interval is used instead.

    Yields
    ------
    tuple
        The chosen ``(timestamp, item)`` pairs in time order. Reading stops at the first
        frame at or after ``end``, so a window near the start never decodes the rest.
    """
    if fps is None:
        for t, item in frames:
            if t >= end - _EPS:
                return
            if t >= start - _EPS:
                yield t, item
        return
    k = math.ceil(start * fps - _EPS)
    prev: tuple[float, Any] | None = None
    last_interval = 0.0
    for t, item in frames:
        if t < start - _EPS:
            continue
        if t >= end - _EPS:
            break
        # Every pending target at or before this frame lies between prev and this frame,
        # so its nearest frame is one of the two.
        while (target := k / fps) < end - _EPS and t >= target - _EPS:
            if prev is not None and target - prev[0] <= t - target + _EPS:
                yield prev
            else:
                yield t, item
            k += 1
        if prev is not None:
            last_interval = t - prev[0]
        prev = (t, item)
    if prev is None:
        return
    period = 1.0 / source_fps if source_fps > 0 else last_interval
    stop = min(end, prev[0] + period)
    while k / fps < stop - _EPS:
        yield prev
        k += 1


def capped_rate(fps: float, source_fps: float, path: Any) -> float:
    """``fps`` capped at the source's own rate: above it the sampler only repeats frames
    (``--fps 1e9`` would make a billion copies). A source of unknown rate needs a finite fps."""
    if source_fps > 0:
        return min(fps, source_fps)
    if not math.isfinite(fps):
        raise VideoInputError(f"{path} does not state its frame rate; give a finite fps, got {fps}")
    return fps


def source_rate(path: str | os.PathLike[str], folder_fps: float = 1.0) -> float:
    """The nominal frame rate of a video file (``folder_fps`` for a frame folder; 0 if unknown),
    read from the container without decoding frames."""
    with open_source(path, folder_fps) as source:
        return float(source.source_fps)


def _check_args(
    path: Any, fps: float | None, max_frames: int | None, start: float, end: float | None,
    allow_infinite: bool = False,
) -> float:
    """Validate sampling parameters; returns ``end`` as a float (``inf`` when None).
    ``allow_infinite``: an infinite fps means "every frame at the source rate"."""
    if fps is not None and not (fps > 0 and (math.isfinite(fps) or allow_infinite)):
        what = "a positive number" if allow_infinite else "a positive, finite number"
        raise VideoInputError(f"fps must be {what} to sample {path}, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise VideoInputError(f"max_frames must be at least 1 to read {path}, got {max_frames}")
    if not (start >= 0 and math.isfinite(start)):
        raise VideoInputError(f"start must be a time >= 0 s to read {path}, got {start}")
    end_f = math.inf if end is None else float(end)
    if not end_f > start:
        raise VideoInputError(f"end ({end}) must be after start ({start}) to read {path}")
    return end_f


def _sampled_frames(
    path: str | os.PathLike[str],
    fps: float | None,
    max_frames: int | None,
    start: float,
    end: float | None,
    folder_fps: float,
    cap_at_source_rate: bool = False,
) -> Iterator[tuple[float, np.ndarray, float]]:
    """Yield ``(timestamp, rgb (H, W, 3) uint8, source_fps)`` for each selected frame.

    Raises VideoInputError when nothing is selected, distinguishing a source without a
    single decodable frame from a window that misses all of them.
    """
    end_f = _check_args(path, fps, max_frames, start, end, allow_infinite=cap_at_source_rate)
    with open_source(path, folder_fps) as source:
        if cap_at_source_rate and fps is not None:
            fps = capped_rate(fps, source.source_fps, path)
        seen = 0
        last_t = 0.0

        def counted() -> Iterator[tuple[float, Loader]]:
            nonlocal seen, last_t
            for t, loader in source.frames():
                seen += 1
                last_t = t
                yield t, loader

        count = 0
        shape: tuple[int, ...] | None = None
        for t, loader in select_frames(counted(), fps, start, end_f, source.source_fps):
            rgb = loader()
            if shape is None:
                shape = rgb.shape
            elif rgb.shape != shape:
                raise VideoInputError(
                    f"frame size of {path} changes at {t:.3f} s from {shape[1]}x{shape[0]} "
                    f"to {rgb.shape[1]}x{rgb.shape[0]}"
                )
            yield t, rgb, source.source_fps
            count += 1
            if max_frames is not None and count >= max_frames:
                return
        if count == 0:
            if seen == 0:
                raise VideoInputError(f"video {path} has no decodable frames")
            window = f"[{start:g}, {end_f:g}) s"
            raise VideoInputError(
                f"video {path} has no frames in the window {window}; its last frame is at "
                f"{last_t:.3f} s"
            )


def _to_video_frames(
    items: list[tuple[float, np.ndarray, float]], path: str, source_fps: float
) -> VideoFrames:
    return VideoFrames(
        frames=np.stack([rgb for _, rgb, _ in items]),
        timestamps=np.array([t for t, _, _ in items], dtype=np.float64),
        source_fps=source_fps,
        path=path,
    )


def read_video(
    path: str | os.PathLike[str],
    fps: float | None = None,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
    *,
    folder_fps: float = 1.0,
    cap_at_source_rate: bool = False,
) -> VideoFrames:
    """Decode a video file or frame folder into memory, sampled at ``fps``.

    Parameters
    ----------
    path
        A video file (.mp4, .webm, .mkv, .avi, .mov) or a folder of frame images
        (.jpg, .jpeg, .png, .bmp, .webp) taken in natural file-name order.
    fps
        Target sampling rate in frames per second (see the module docstring for the
        rule); None keeps every frame.
    max_frames
        Keep at most this many frames (the first ones); decoding stops there.
    start, end
        Window ``[start, end)`` in seconds; ``end=None`` means the end of the video.
    folder_fps
        Rate at which the images of a frame folder are assumed to be shot.
    cap_at_source_rate
        Sample at most at the source's own rate (no repeated frames; ``fps=inf`` then
        means every frame). The command line always sets it.

    Returns
    -------
    VideoFrames
        ``frames`` of shape ``(T, H, W, 3)`` uint8 RGB and ``timestamps`` of shape ``(T,)``.

    Raises
    ------
    VideoInputError
        Missing path, unsupported extension, not a video / corrupt, no decodable frames,
        no frames in the window, empty frame folder, frames of different sizes, or
        invalid sampling parameters. The message names the file.
    """
    items = list(_sampled_frames(path, fps, max_frames, start, end, folder_fps, cap_at_source_rate))
    return _to_video_frames(items, str(path), items[0][2])


def iter_video_chunks(
    path: str | os.PathLike[str],
    fps: float | None,
    chunk_frames: int,
    *,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
    folder_fps: float = 1.0,
    cap_at_source_rate: bool = False,
) -> Iterator[VideoFrames]:
    """Decode a video lazily, yielding chunks of ``chunk_frames`` sampled frames.

    Only one chunk (plus one look-ahead decoded frame) is held in memory, so arbitrarily
    long streams can be fed to a model. Concatenating the chunks gives exactly
    :func:`read_video` with the same arguments.

    Parameters
    ----------
    path, fps, max_frames, start, end, folder_fps, cap_at_source_rate
        As in :func:`read_video`.
    chunk_frames
        Frames per chunk; the last chunk may be shorter.

    Yields
    ------
    VideoFrames
        Chunks with ``frames`` of shape ``(C, H, W, 3)``, ``C <= chunk_frames``.

    Raises
    ------
    VideoInputError
        As :func:`read_video`; raised when iteration reaches the problem (an unreadable
        file fails on the first ``next``).
    """
    if chunk_frames < 1:
        raise VideoInputError(f"chunk_frames must be at least 1 to read {path}, got {chunk_frames}")
    buffer: list[tuple[float, np.ndarray, float]] = []
    for item in _sampled_frames(path, fps, max_frames, start, end, folder_fps, cap_at_source_rate):
        buffer.append(item)
        if len(buffer) == chunk_frames:
            yield _to_video_frames(buffer, str(path), item[2])
            buffer = []
    if buffer:
        yield _to_video_frames(buffer, str(path), buffer[0][2])
