"""Live frame sources for the server, sampled by the wall clock.

A source yields ``(frame, media_seconds)`` in order. Files and frame folders are decoded
lazily (:func:`hermes_policy.inputs.video.iter_video_chunks`, already sampled at the stream's fps)
and *played at their own rate*: :func:`paced` holds each frame back until the wall clock
reaches its media time. Capture devices and network streams (RTSP, HLS, HTTP) arrive in
real time by themselves; :class:`LiveVideoSource` decodes them with PyAV and keeps one frame
per ``1 / fps`` of media time. The synthetic source plays the built-in stream of the
model's kind (text frames for causal LMs, moving shapes for video models) at ``fps``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.errors import VideoInputError

Frame = Any  # uint8 (H, W, 3) array, or one text frame (LongTensor (N,) / string)


@dataclass(frozen=True)
class SourceSpec:
    """What to stream: ``kind`` is synthetic, file, folder, device or url."""

    kind: str
    location: str | None = None  # path, device or URL
    frames: int = 1_000_000  # synthetic: stream length
    seed: int = 0  # synthetic
    realtime: bool = True  # files, folders, synthetic: played at their own rate

    KINDS = ("synthetic", "file", "folder", "device", "url")


def synthetic_frames(adapter: Any, spec: SourceSpec, fps: float) -> Iterator[tuple[Frame, float]]:
    """The built-in synthetic stream of the model's kind, in blocks generated as needed."""
    from hermes_policy.inputs.synthetic_shapes import shapes_video
    from hermes_policy.inputs.synthetic_text import text_stream

    block = 256
    for start in range(0, spec.frames, block):
        n = min(block, spec.frames - start)
        seed = spec.seed + start // block
        if adapter.is_text_only:
            frames = text_stream(n, seed=seed).frames
        else:
            frames = shapes_video(n, seed=seed).frames
        for i in range(n):
            yield frames[i], (start + i) / fps


def file_frames(path: str, fps: float) -> Iterator[tuple[Frame, float]]:
    """A video file or frame folder, decoded lazily and sampled at ``fps``."""
    from hermes_policy.inputs.video import iter_video_chunks

    if not Path(path).exists():
        raise VideoInputError(f"video not found: {path}")
    for chunk in iter_video_chunks(path, fps, 1):
        yield chunk.frames[0], float(chunk.timestamps[0])


# libavdevice input formats a ``device`` location may name (``lavfi``: FFmpeg's virtual
# test-pattern devices, e.g. ``lavfi:testsrc=size=640x360:rate=30``)
DEVICE_FORMATS = ("v4l2", "avfoundation", "dshow", "gdigrab", "x11grab", "kmsgrab", "decklink", "android_camera", "lavfi")


def device_input(location: str) -> tuple[str, str]:
    """``(input, format)`` for PyAV of a capture device location: ``/dev/videoN`` (V4L2) or
    ``FORMAT:INPUT`` with FORMAT one of :data:`DEVICE_FORMATS` (``avfoundation:0``,
    ``dshow:video=USB Camera``, ``x11grab::0.0``)."""
    if location.startswith("/dev/"):
        return location, "v4l2"
    kind, sep, spec = location.partition(":")
    if not sep or kind not in DEVICE_FORMATS or not spec:
        raise VideoInputError(
            f"a device is /dev/videoN or FORMAT:INPUT with FORMAT one of {', '.join(DEVICE_FORMATS)}; got {location!r}"
        )
    return spec, kind


class LiveVideoSource:
    """A capture device or network stream through PyAV, one frame per ``1 / fps`` of media time.

    ``device``: ``location`` names a capture device (:func:`device_input`), else a URL.
    """

    def __init__(self, location: str, fps: float, device: bool = False):
        try:
            import av
        except ImportError as exc:  # pragma: no cover - PyAV is a dependency
            raise VideoInputError("live sources need PyAV (pip install av)") from exc
        options = {}
        if device:
            location, options["format"] = device_input(location)
        try:
            self._container = av.open(location, timeout=10.0, **options)
        except Exception as exc:  # noqa: BLE001 - PyAV raises many error types for a bad source
            raise VideoInputError(f"cannot open {location}: {exc}") from exc
        if not self._container.streams.video:
            raise VideoInputError(f"{location} has no video stream")
        self._stream = self._container.streams.video[0]
        self.fps = fps

    def __iter__(self) -> Iterator[tuple[Frame, float]]:
        next_tick = 0.0
        first: float | None = None
        try:
            for frame in self._container.decode(self._stream):
                t = float(frame.time) if frame.time is not None else time.monotonic()
                first = t if first is None else first
                media = t - first
                if media + 1e-6 < next_tick:
                    continue
                next_tick += 1.0 / self.fps
                while next_tick <= media:  # a gap in the source: keep the ticks on the clock
                    next_tick += 1.0 / self.fps
                yield frame.to_ndarray(format="rgb24"), media
        finally:
            self._container.close()


def open_source(adapter: Any, spec: SourceSpec, fps: float) -> Iterator[tuple[Frame, float]]:
    """The frames of ``spec``, sampled at ``fps`` (not yet paced; see :func:`paced`)."""
    if spec.kind not in SourceSpec.KINDS:
        raise VideoInputError(f"unknown source {spec.kind!r}; choose one of {', '.join(SourceSpec.KINDS)}")
    if spec.kind == "synthetic":
        return synthetic_frames(adapter, spec, fps)
    if not spec.location:
        raise VideoInputError(f"a {spec.kind} source needs a location (path, device or URL)")
    if adapter.is_text_only:
        raise VideoInputError(f"{adapter.name_or_path} is a text-only model and cannot watch videos")
    if spec.kind in ("file", "folder"):
        kind_ok = Path(spec.location).is_dir() == (spec.kind == "folder")
        if Path(spec.location).exists() and not kind_ok:
            raise VideoInputError(f"{spec.location} is not a {spec.kind}")
        return file_frames(spec.location, fps)
    return iter(LiveVideoSource(spec.location, fps, device=spec.kind == "device"))


def paced(
    frames: Iterator[tuple[Frame, float]],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stopped: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[Frame, float, float]]:
    """Release each frame when the wall clock reaches its media time.

    Yields ``(frame, media_seconds, arrival)`` where ``arrival`` is the clock reading when
    the frame was released. Sleeps in short steps so that ``stopped`` is seen promptly.
    """
    start = clock()
    for frame, media in frames:
        while not stopped():
            wait = start + media - clock()
            if wait <= 0:
                break
            sleep(min(wait, 0.05))
        if stopped():
            return
        yield frame, media, clock()


def frame_to_jpeg(frame: Any, max_side: int = 320) -> bytes | None:
    """A video frame as a small JPEG for the page (None for text frames)."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        return None
    from PIL import Image

    image = Image.fromarray(frame)
    image.thumbnail((max_side, max_side))
    from io import BytesIO

    out = BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()
