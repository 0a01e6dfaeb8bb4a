"""Decoders: a video file (PyAV, else OpenCV) or a folder of frame images, as timed frames.

Each source yields ``(timestamp, loader)`` pairs on one clock, seconds since the first
decoded frame (see :mod:`hermes_policy.inputs.video` for the clock and the sampling rule);
the loader produces the ``(H, W, 3)`` uint8 RGB array only when called, so frames the
sampler skips are never converted or read. PyAV is used when it can be imported (the GPU
machine has none), OpenCV otherwise; both return the same frames for the same file.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.errors import VideoInputError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Loader = Callable[[], np.ndarray]



class FrameSource(ABC):
    """An opened source of frames; use as a context manager so it is always closed."""

    source_fps: float = 0.0

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional: sources without a decoder keep it
        """Release the decoder."""

    @abstractmethod
    def frames(self) -> Iterator[tuple[float, Loader]]:
        """Yield ``(timestamp_seconds, loader)`` for every frame, in display order."""


def import_av() -> Any | None:
    """PyAV if it can be imported, else None (tests hide it through ``sys.modules``)."""
    try:
        import av
    except ImportError:
        return None
    return av


def import_cv2() -> Any | None:
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


class PyAVSource(FrameSource):
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


class OpenCVSource(FrameSource):
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


class FolderSource(FrameSource):
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


def open_source(path: str | os.PathLike[str], folder_fps: float) -> FrameSource:
    """Open a file or folder, choosing the decoder; all user errors become VideoInputError."""
    p = Path(path)
    if not p.exists():
        raise VideoInputError(f"video not found: {p}")
    if p.is_dir():
        if not (folder_fps > 0 and math.isfinite(folder_fps)):
            raise VideoInputError(f"folder_fps must be > 0 for frame folder {p}, got {folder_fps}")
        return FolderSource(p, folder_fps)
    if p.suffix.lower() not in VIDEO_EXTENSIONS:
        raise VideoInputError(
            f"unsupported video file {p}: extension {p.suffix or '(none)'!r} is not one of "
            f"{', '.join(VIDEO_EXTENSIONS)} (or pass a folder of frame images)"
        )
    av = import_av()
    if av is not None:
        return PyAVSource(av, p)
    cv2 = import_cv2()
    if cv2 is not None:
        return OpenCVSource(cv2, p)
    raise VideoInputError(
        f"cannot decode {p}: neither PyAV (pip install av) nor OpenCV "
        "(pip install opencv-python-headless) is installed"
    )
