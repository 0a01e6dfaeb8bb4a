"""Encode RGB frames to a video file, atomically (PyAV, else OpenCV)."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.fileio.atomic import atomic_path
from hermes_policy.inputs.video_decoders import import_av, import_cv2

WRITE_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi")


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
        av = import_av()
        if av is not None:
            _write_pyav(av, tmp, arr, fps, fmt)
        else:
            cv2 = import_cv2()
            if cv2 is None:
                raise RuntimeError("writing video needs PyAV (av) or opencv-python-headless")
            _write_cv2(cv2, tmp, arr, fps)
    return dest
