"""Video input: decoding (PyAV and the OpenCV fallback), sampling, folders, errors, writing."""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from hermes_policy.errors import VideoInputError
from hermes_policy.inputs import video, video_decoders
from hermes_policy.inputs.video import VideoFrames, iter_video_chunks, read_video
from hermes_policy.inputs.video_writing import write_video

NUM_FRAMES, SOURCE_FPS, HEIGHT, WIDTH = 20, 10.0, 48, 64


def make_frames(n: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 frames whose index can be read back after lossy coding.

    Frame ``i`` is a flat grey of level ``10 * i + 20`` with a red square whose position
    also moves with ``i``; flat areas survive h264 / mpeg4 almost unchanged.
    """
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = 10 * i + 20
        x = 4 + 2 * i
        frames[i, 8:24, x : x + 16] = (220, 30, 30)
    return frames


def frame_index(rgb: np.ndarray) -> int:
    """Recover the index written by :func:`make_frames` from the grey corner."""
    return int(round((float(rgb[-6:, -6:].mean()) - 20) / 10))


def hide_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import av`` fail, as on the GPU machine (a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, "av", None)
    assert video_decoders.import_av() is None


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return make_frames()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, frames: np.ndarray) -> Path:
    """An mp4 of :func:`make_frames` at 10 fps (2 s)."""
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, SOURCE_FPS)


@pytest.fixture(params=["pyav", "opencv"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with PyAV and once with PyAV hidden (the OpenCV fallback)."""
    if request.param == "pyav":
        pytest.importorskip("av")
    else:
        pytest.importorskip("cv2")
        hide_pyav(monkeypatch)
    return request.param


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def test_read_all_frames(clip: Path, frames: np.ndarray, backend: str) -> None:
    v = read_video(clip)
    assert isinstance(v, VideoFrames)
    assert v.frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert v.frames.dtype == np.uint8
    assert len(v) == v.num_frames == NUM_FRAMES
    np.testing.assert_allclose(v.timestamps, np.arange(NUM_FRAMES) / SOURCE_FPS, atol=1e-6)
    assert v.source_fps == pytest.approx(SOURCE_FPS)
    assert v.path == str(clip)
    diff = np.abs(v.frames.astype(np.int16) - frames.astype(np.int16))
    assert diff.mean() < 3.0
    assert [frame_index(f) for f in v.frames] == list(range(NUM_FRAMES))


def test_pyav_and_opencv_agree(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("av")
    pytest.importorskip("cv2")
    with_av = read_video(clip)
    hide_pyav(monkeypatch)
    with_cv = read_video(clip)
    assert with_cv.frames.shape == with_av.frames.shape
    np.testing.assert_allclose(with_cv.timestamps, with_av.timestamps, atol=1e-6)
    assert with_cv.source_fps == pytest.approx(with_av.source_fps)
    per_frame = np.abs(with_cv.frames.astype(np.int16) - with_av.frames.astype(np.int16))
    assert per_frame.mean(axis=(1, 2, 3)).max() < 2.0


def test_write_with_opencv_fallback(tmp_path: Path, frames: np.ndarray) -> None:
    pytest.importorskip("cv2")
    with pytest.MonkeyPatch.context() as mp:
        hide_pyav(mp)
        path = write_video(tmp_path / "cv.mp4", frames, SOURCE_FPS)
        v = read_video(path)
    assert v.frames.shape == frames.shape
    assert [frame_index(f) for f in v.frames] == list(range(NUM_FRAMES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.mp4"]


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        (None, [i / 10 for i in range(20)]),
        (10.0, [i / 10 for i in range(20)]),
        (2.0, [0.0, 0.5, 1.0, 1.5]),
        (1.0, [0.0, 1.0]),
        # Targets k/3 fall between frames: the nearest frame is taken.
        (3.0, [0.0, 0.3, 0.7, 1.0, 1.3, 1.7]),
        # Targets up to the end of the last frame (2.0 s) count, so 0.5 fps gives 1 frame.
        (0.5, [0.0]),
    ],
)
def test_sampling_at_target_fps(clip: Path, fps: float | None, expected: list[float]) -> None:
    v = read_video(clip, fps=fps)
    np.testing.assert_allclose(v.timestamps, expected, atol=1e-6)
    # The pixels are those of the chosen frame, not of some other frame.
    assert [frame_index(f) for f in v.frames] == [round(t * 10) for t in expected]


def test_sampling_above_source_rate_repeats_frames(clip: Path) -> None:
    v = read_video(clip, fps=20.0)
    assert len(v) == 40  # real-time rate kept: 2 s x 20 fps
    # Target k/20 is nearest to frame k//2 (ties go to the earlier frame).
    assert [frame_index(f) for f in v.frames] == [k // 2 for k in range(40)]


def test_window_and_max_frames(clip: Path) -> None:
    v = read_video(clip, fps=2.0, start=0.5, end=1.5)
    np.testing.assert_allclose(v.timestamps, [0.5, 1.0], atol=1e-6)
    v = read_video(clip, start=0.5, end=1.5)
    assert [frame_index(f) for f in v.frames] == list(range(5, 15))
    v = read_video(clip, fps=None, max_frames=3)
    assert [frame_index(f) for f in v.frames] == [0, 1, 2]
    v = read_video(clip, fps=3.0, max_frames=4)
    np.testing.assert_allclose(v.timestamps, [0.0, 0.3, 0.7, 1.0], atol=1e-6)


def test_select_frames_nearest_rule() -> None:
    # Irregular timestamps: targets 0, 0.5, 1.0, 1.5 at 2 fps; last frame shows until 1.8.
    stream = [(0.0, "a"), (0.1, "b"), (0.8, "c"), (1.2, "d"), (1.7, "e")]
    picked = list(video.select_frames(iter(stream), 2.0, 0.0, float("inf"), source_fps=10.0))
    assert [name for _, name in picked] == ["a", "c", "c", "e"]
    # A tie (0.5 is 0.3 from both 0.2 and 0.8) goes to the earlier frame.
    tie = [(0.2, "b"), (0.8, "c")]
    assert [n for _, n in video.select_frames(iter(tie), 2.0, 0.0, 0.9, 0.0)] == ["b", "b"]


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("fps", [None, 3.0])
def test_chunks_equal_read_video(clip: Path, fps: float | None, chunk: int) -> None:
    whole = read_video(clip, fps=fps)
    chunks = list(iter_video_chunks(clip, fps, chunk))
    assert all(len(c) == chunk for c in chunks[:-1])
    assert 1 <= len(chunks[-1]) <= chunk
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    np.testing.assert_array_equal(np.concatenate([c.timestamps for c in chunks]), whole.timestamps)
    assert {c.source_fps for c in chunks} == {whole.source_fps}


def test_chunks_are_lazy(clip: Path) -> None:
    """Taking the first chunk does not need (or fail on) the rest of the stream."""
    first = next(iter_video_chunks(clip, None, 2))
    assert [frame_index(f) for f in first.frames] == [0, 1]


# ---------------------------------------------------------------------------------------
# Frame folders
# ---------------------------------------------------------------------------------------


def save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def test_frame_folder_natural_order(tmp_path: Path) -> None:
    frames = make_frames(12)
    for i in range(12):
        # Lexical order would put frame_10 before frame_2; mixed extensions are fine.
        ext = ".png" if i % 2 else ".bmp"
        save_png(tmp_path / f"frame_{i}{ext}", frames[i])
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    v = read_video(tmp_path, folder_fps=2.0)
    np.testing.assert_array_equal(v.frames, frames)  # lossless formats
    np.testing.assert_allclose(v.timestamps, np.arange(12) / 2.0)
    assert v.source_fps == 2.0
    v = read_video(tmp_path, fps=1.0, folder_fps=2.0)
    assert [frame_index(f) for f in v.frames] == [0, 2, 4, 6, 8, 10]
    chunks = list(iter_video_chunks(tmp_path, 1.0, 4, folder_fps=2.0))
    assert [len(c) for c in chunks] == [4, 2]


def test_natural_key() -> None:
    names = ["f10.jpg", "f2.jpg", "F1.jpg", "f2a.jpg", "g.jpg", "f02b.jpg"]
    assert sorted(names, key=video_decoders.natural_key) == [
        "F1.jpg",
        "f2.jpg",
        "f2a.jpg",
        "f02b.jpg",
        "f10.jpg",
        "g.jpg",
    ]


def test_frame_folder_default_fps_and_grayscale(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((10, 12), 50 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    v = read_video(tmp_path)
    assert v.frames.shape == (3, 10, 12, 3)
    np.testing.assert_array_equal(v.timestamps, [0.0, 1.0, 2.0])


# ---------------------------------------------------------------------------------------
# Bad input: one VideoInputError whose message names the file
# ---------------------------------------------------------------------------------------


def assert_clean_error(exc: pytest.ExceptionInfo[VideoInputError], name: str) -> None:
    message = str(exc.value)
    assert name in message
    assert "\n" not in message and "Traceback" not in message


def garbage_packets_mkv(path: Path) -> Path:
    """A Matroska file with an h264 stream whose packets decode to nothing."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        for i in range(3):
            packet = av.Packet(bytes([0x55]) * 500)
            packet.stream = stream
            packet.pts = packet.dts = i
            packet.time_base = Fraction(1, 10)
            out.mux(packet)
    return path


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("text.mp4", b"this is not a video\n" * 20),
        ("empty.webm", b""),
        ("random.mkv", bytes(range(256)) * 16),
    ],
)
def test_not_a_video(tmp_path: Path, backend: str, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VideoInputError) as exc:
        read_video(path)
    assert_clean_error(exc, name)


def test_truncated_video(tmp_path: Path, clip: Path, backend: str) -> None:
    path = tmp_path / "truncated.mp4"
    path.write_bytes(clip.read_bytes()[:300])
    with pytest.raises(VideoInputError) as exc:
        read_video(path)
    assert_clean_error(exc, "truncated.mp4")


def test_no_decodable_frames(tmp_path: Path) -> None:
    path = garbage_packets_mkv(tmp_path / "undecodable.mkv")
    for hide in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if hide:
                pytest.importorskip("cv2")
                hide_pyav(mp)
            with pytest.raises(VideoInputError) as exc:
                read_video(path)
        assert_clean_error(exc, "undecodable.mkv")
        assert "no decodable frames" in str(exc.value)


def test_window_without_frames(clip: Path, backend: str) -> None:
    with pytest.raises(VideoInputError, match="no frames in the window") as exc:
        read_video(clip, start=5.0)
    assert_clean_error(exc, clip.name)
    with pytest.raises(VideoInputError):
        next(iter_video_chunks(clip, 1.0, 4, start=5.0))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(VideoInputError, match="not found") as exc:
        read_video(tmp_path / "nowhere.mp4")
    assert_clean_error(exc, "nowhere.mp4")
    with pytest.raises(VideoInputError):
        next(iter_video_chunks(tmp_path / "nowhere.mp4", 1.0, 4))


@pytest.mark.parametrize("name", ["clip.gif", "notes.txt", "frame.png", "noextension"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"x" * 100)
    with pytest.raises(VideoInputError, match="unsupported") as exc:
        read_video(path)
    assert_clean_error(exc, name)


def test_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty_frames"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(VideoInputError, match="no images") as exc:
        read_video(folder)
    assert_clean_error(exc, "empty_frames")


def test_folder_frames_of_different_sizes(tmp_path: Path) -> None:
    save_png(tmp_path / "1.png", np.zeros((10, 12, 3), np.uint8))
    save_png(tmp_path / "2.png", np.zeros((10, 12, 3), np.uint8))
    save_png(tmp_path / "3.png", np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(VideoInputError, match="one size") as exc:
        read_video(tmp_path)
    assert_clean_error(exc, "3.png")


def test_folder_with_corrupt_image(tmp_path: Path) -> None:
    save_png(tmp_path / "1.png", np.zeros((10, 12, 3), np.uint8))
    (tmp_path / "2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VideoInputError) as exc:
        read_video(tmp_path)
    assert_clean_error(exc, "2.jpg")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fps": 0.0},
        {"fps": -1.0},
        {"max_frames": 0},
        {"start": -1.0},
        {"start": 1.0, "end": 1.0},
        {"folder_fps": 0.0},
    ],
)
def test_bad_parameters(clip: Path, tmp_path: Path, kwargs: dict) -> None:
    target = tmp_path if "folder_fps" in kwargs else clip
    if "folder_fps" in kwargs:
        save_png(tmp_path / "1.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(VideoInputError) as exc:
        read_video(target, **kwargs)
    assert_clean_error(exc, target.name)


def test_bad_chunk_size(clip: Path) -> None:
    with pytest.raises(VideoInputError) as exc:
        next(iter_video_chunks(clip, 1.0, 0))
    assert_clean_error(exc, clip.name)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def test_write_video_is_atomic_and_overwrites(tmp_path: Path, frames: np.ndarray) -> None:
    path = tmp_path / "sub" / "out.mp4"
    write_video(path, frames[:5], 5.0)
    write_video(path, frames, 0.5)  # replaces the file; fractional rate
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.mp4"]
    v = read_video(path)
    assert len(v) == NUM_FRAMES
    np.testing.assert_allclose(v.timestamps, np.arange(NUM_FRAMES) * 2.0, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "dtype", "fps", "name"),
    [
        ((3, 15, 16, 3), np.uint8, 1.0, "odd.mp4"),
        ((3, 16, 16), np.uint8, 1.0, "gray.mp4"),
        ((3, 16, 16, 3), np.float32, 1.0, "float.mp4"),
        ((3, 16, 16, 3), np.uint8, 0.0, "zero_fps.mp4"),
        ((3, 16, 16, 3), np.uint8, 1.0, "clip.webm"),
    ],
)
def test_write_video_rejects_bad_input(
    tmp_path: Path, shape: tuple[int, ...], dtype: type, fps: float, name: str
) -> None:
    with pytest.raises(ValueError):
        write_video(tmp_path / name, np.zeros(shape, dtype), fps)
    assert list(tmp_path.iterdir()) == []
