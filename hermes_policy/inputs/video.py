"""Video input: decode a video file or a folder of frame images into RGB frames.

Decoding uses PyAV (``av``) and falls back to OpenCV (``cv2``) when PyAV cannot be
imported (the GPU machine has no PyAV). Both return the same frames for the same file.

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
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.errors import VideoInputError
from hermes_policy.fileio.atomic import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
WRITE_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi")

# Float timestamps from pts * time_base and targets k / fps differ by rounding only; this
# slack makes "at or after" and tie decisions identical across decoders.
_EPS = 1e-6

Loader = Callable[[], np.ndarray]


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


# ---------------------------------------------------------------------------------------
# Sources: each yields (timestamp, loader) pairs; the loader produces the (H, W, 3) uint8
# RGB array only when called, so frames the sampler skips are never converted or read.
# ---------------------------------------------------------------------------------------


class _Source(ABC):
    """An opened source of frames; use as a context manager so it is always closed."""

    source_fps: float = 0.0

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional: sources without a decoder keep it
        """Release the decoder."""

    @abstractmethod
    def frames(self) -> Iterator[tuple[float, Loader]]:
        """Yield ``(timestamp_seconds, loader)`` for every frame, in display order."""


def _import_av() -> Any | None:
    """PyAV if it can be imported, else None (tests hide it through ``sys.modules``)."""
    try:
        import av
    except ImportError:
        return None
    return av


def _import_cv2() -> Any | None:
    """OpenCV if it can be imported, else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _monotonic(
    pairs: Iterator[tuple[float | None, Any]], fps: float
) -> Iterator[tuple[float, Any]]:
    """Shift raw presentation times to start at 0 and make them strictly increase.

    A missing time, or one that does not advance (broken or duplicated pts), becomes the
    previous time plus one frame period, so the sampler's ordering assumption always holds.
    """
    period = 1.0 / fps if fps > 0 else 1.0
    first: float | None = None
    prev: float | None = None
    for raw, payload in pairs:
        if first is None and raw is not None and math.isfinite(raw):
            first = raw
        if raw is None or not math.isfinite(raw) or first is None:
            t = 0.0 if prev is None else prev + period
        else:
            t = raw - first
            if prev is not None and t <= prev:
                t = prev + period
        prev = t
        yield t, payload


class _PyAVSource(_Source):
    def __init__(self, av: Any, path: Path):
        self.path = path
        try:
            # av raises several unrelated types here (InvalidDataError, EOFError, OSError),
            # so the boundary catches them all and reports one message.
            self._container = av.open(str(path))
        except Exception as exc:
            raise VideoInputError(f"cannot read video {path}: not a video file or corrupt") from exc
        if not self._container.streams.video:
            self._container.close()
            raise VideoInputError(f"cannot read video {path}: it has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self.source_fps = float(rate) if rate else 0.0

    def close(self) -> None:
        self._container.close()

    def frames(self) -> Iterator[tuple[float, Loader]]:
        for t, frame in _monotonic(self._decoded(), self.source_fps):
            yield t, lambda frame=frame: self._to_rgb(frame)

    def _decoded(self) -> Iterator[tuple[float | None, Any]]:
        count = 0
        try:
            for frame in self._container.decode(self._stream):
                count += 1
                yield frame.time, frame
        except Exception as exc:
            raise VideoInputError(
                f"cannot decode video {self.path}: corrupt data after {count} frames"
            ) from exc

    def _to_rgb(self, frame: Any) -> np.ndarray:
        try:
            return frame.to_ndarray(format="rgb24")
        except Exception as exc:
            raise VideoInputError(f"cannot convert a frame of {self.path} to RGB") from exc


class _OpenCVSource(_Source):
    def __init__(self, cv2: Any, path: Path):
        self.path = path
        self._cv2 = cv2
        try:
            self._cap = cv2.VideoCapture(str(path))
            opened = self._cap.isOpened()
        except Exception as exc:
            raise VideoInputError(f"cannot read video {path}: not a video file or corrupt") from exc
        if not opened:
            self._cap.release()
            raise VideoInputError(f"cannot read video {path}: not a video file or corrupt")
        # PyAV does not apply rotation metadata; match it so both decoders agree.
        if hasattr(cv2, "CAP_PROP_ORIENTATION_AUTO"):
            self._cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.source_fps = fps if math.isfinite(fps) and fps > 0 else 0.0

    def close(self) -> None:
        self._cap.release()

    def frames(self) -> Iterator[tuple[float, Loader]]:
        for t, bgr in _monotonic(self._decoded(), self.source_fps):
            yield t, lambda bgr=bgr: np.ascontiguousarray(bgr[..., ::-1])

    def _decoded(self) -> Iterator[tuple[float | None, np.ndarray]]:
        index = 0
        while True:
            try:
                ok, bgr = self._cap.read()
            except Exception as exc:
                raise VideoInputError(
                    f"cannot decode video {self.path}: corrupt data after {index} frames"
                ) from exc
            if not ok or bgr is None:
                return
            msec = self._cap.get(self._cv2.CAP_PROP_POS_MSEC)
            # POS_MSEC is the pts of the frame just read; some builds report 0 or -1 for
            # every frame, then counting frames at the nominal rate is the best guess.
            if index > 0 and not (msec > 0) and self.source_fps > 0:
                yield index / self.source_fps, bgr
            else:
                yield (msec / 1000.0 if msec >= 0 else None), bgr
            index += 1


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key giving natural order: ``frame2.jpg`` before ``frame10.jpg``.

    ``re.split`` with a capture group alternates text and digit runs (text first), so
    position parity fixes each part's type and tuples always compare like with like.
    """
    parts = re.split(r"(\d+)", name)
    return (*(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name)


class _FolderSource(_Source):
    def __init__(self, path: Path, folder_fps: float):
        self.path = path
        self.source_fps = float(folder_fps)
        files = [
            f
            for f in path.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not files:
            raise VideoInputError(
                f"frame folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        self.files = sorted(files, key=lambda f: natural_key(f.name))
        self.size = self._check_sizes()

    def _check_sizes(self) -> tuple[int, int]:
        """Read every image header (cheap, no pixel decode); all frames must share a size."""
        from PIL import Image

        size: tuple[int, int] | None = None
        for f in self.files:
            try:
                with Image.open(f) as img:
                    this = img.size
            except Exception as exc:
                raise VideoInputError(
                    f"cannot read frame image {f}: not an image or corrupt"
                ) from exc
            if size is None:
                size = this
            elif this != size:
                raise VideoInputError(
                    f"frame {f} is {this[0]}x{this[1]} but earlier frames of {self.path} "
                    f"are {size[0]}x{size[1]}; all frames of a folder must have one size"
                )
        assert size is not None
        return size

    def frames(self) -> Iterator[tuple[float, Loader]]:
        for i, f in enumerate(self.files):
            yield i / self.source_fps, lambda f=f: self._load(f)

    @staticmethod
    def _load(f: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(f) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except Exception as exc:
            raise VideoInputError(f"cannot read frame image {f}: not an image or corrupt") from exc


def _open_source(path: str | os.PathLike[str], folder_fps: float) -> _Source:
    """Open a file or folder, choosing the decoder; all user errors become VideoInputError."""
    p = Path(path)
    if not p.exists():
        raise VideoInputError(f"video not found: {p}")
    if p.is_dir():
        if not (folder_fps > 0 and math.isfinite(folder_fps)):
            raise VideoInputError(f"folder_fps must be > 0 for frame folder {p}, got {folder_fps}")
        return _FolderSource(p, folder_fps)
    if p.suffix.lower() not in VIDEO_EXTENSIONS:
        raise VideoInputError(
            f"unsupported video file {p}: extension {p.suffix or '(none)'!r} is not one of "
            f"{', '.join(VIDEO_EXTENSIONS)} (or pass a folder of frame images)"
        )
    av = _import_av()
    if av is not None:
        return _PyAVSource(av, p)
    cv2 = _import_cv2()
    if cv2 is not None:
        return _OpenCVSource(cv2, p)
    raise VideoInputError(
        f"cannot decode {p}: neither PyAV (pip install av) nor OpenCV "
        "(pip install opencv-python-headless) is installed"
    )


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


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
    with _open_source(path, folder_fps) as source:
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
    with _open_source(path, folder_fps) as source:
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


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def _check_frames(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must have shape (T>=1, H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    if arr.shape[1] % 2 or arr.shape[2] % 2:
        # yuv420p (what h264 / mpeg4 players expect) subsamples chroma by 2 in each axis.
        raise ValueError(f"frame height and width must be even for yuv420p, got {arr.shape[1:3]}")
    return np.ascontiguousarray(arr)


def _pick_encoder(av: Any) -> str:
    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        return name
    raise RuntimeError("PyAV has neither an h264 nor an mpeg4 encoder")


def _write_pyav(av: Any, tmp: Path, frames: np.ndarray, fps: float, fmt: str) -> None:
    codec = _pick_encoder(av)
    with av.open(str(tmp), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(100_000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            # mpeg4 has no crf; a generous bitrate keeps colours close to the input.
            stream.bit_rate = int(max(2e6, frames.shape[1] * frames.shape[2] * 30))
        else:
            # Near-lossless: tests compare decoded colours with the drawn ones.
            stream.options = {"crf": "12"}
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())


def _write_cv2(cv2: Any, tmp: Path, frames: np.ndarray, fps: float) -> None:
    height, width = frames.shape[1:3]
    level = cv2.utils.logging.getLogLevel()
    # opencv-python wheels usually lack an h264 encoder; silence the failed attempt's log.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        writer = None
        for fourcc in ("avc1", "mp4v"):
            writer = cv2.VideoWriter(
                str(tmp), cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height)
            )
            if writer.isOpened():
                break
            writer.release()
            writer = None
    finally:
        cv2.utils.logging.setLogLevel(level)
    if writer is None:
        raise RuntimeError(f"OpenCV cannot open a video writer for {tmp.suffix} files")
    try:
        for rgb in frames:
            writer.write(np.ascontiguousarray(rgb[..., ::-1]))
    finally:
        writer.release()


def write_video(path: str | os.PathLike[str], frames: np.ndarray, fps: float) -> Path:
    """Encode frames to a video file, atomically.

    Uses PyAV (h264 if an encoder exists, else mpeg4, yuv420p) and falls back to OpenCV
    (``avc1`` if available, else ``mp4v``). The file is written to a temporary name in the
    same folder and moved into place with :func:`os.replace`, so readers never see a
    half-written video.

    Parameters
    ----------
    path
        Destination; the extension picks the container (.mp4, .mkv, .mov, .avi).
    frames
        ``(T, H, W, 3)`` uint8 RGB, ``T >= 1``, ``H`` and ``W`` even.
    fps
        Frame rate, may be fractional (e.g. 0.5).

    Returns
    -------
    Path
        ``path``.
    """
    dest = Path(path)
    arr = _check_frames(frames)
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be > 0, got {fps}")
    suffix = dest.suffix.lower()
    if suffix not in WRITE_EXTENSIONS:
        raise ValueError(
            f"cannot write {dest}: extension must be one of {', '.join(WRITE_EXTENSIONS)}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".avi": "avi"}[suffix]
    # the real suffix is kept on the temporary file: OpenCV picks the container from it
    with atomic_path(dest, suffix=suffix) as tmp:
        av = _import_av()
        if av is not None:
            _write_pyav(av, tmp, arr, fps, fmt)
        else:
            cv2 = _import_cv2()
            if cv2 is None:
                raise RuntimeError("writing video needs PyAV (av) or opencv-python-headless")
            _write_cv2(cv2, tmp, arr, fps)
    return dest
