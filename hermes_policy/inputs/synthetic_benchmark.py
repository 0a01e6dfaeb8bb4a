"""A streaming-QA benchmark on disk with no download: shapes videos as mp4 plus an
annotation JSON in the common format (docs/annotations.md), to exercise benchmark code."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hermes_policy.fileio.atomic import write_text_atomic
from hermes_policy.inputs.synthetic_shapes import shapes_video


def write_synthetic_benchmark(
    folder: str | os.PathLike[str],
    num_videos: int = 2,
    num_frames: int = 12,
    fps: float = 1.0,
    height: int = 224,
    width: int = 224,
    seed: int = 0,
) -> Path:
    """Write shapes videos and a streaming-QA annotation file.

    Layout: ``folder/videos/synthetic_000.mp4``, ... and ``folder/annotations.json``, a
    JSON list with one entry per video::

        {"video_id": "synthetic_000", "video_path": "videos/synthetic_000.mp4",
         "duration": T / fps,
         "conversations": [{"question": ..., "choices": [...] (multiple choice only),
                            "answer": ..., "end_time": seconds, "task": kind}, ...]}

    ``video_path`` is relative to the folder holding the annotation file. Conversations
    are in time order. Video ``i`` uses seed ``seed + i``. Every file is written
    atomically (temporary name, then ``os.replace``).

    Parameters
    ----------
    folder
        Output folder (created if missing).
    num_videos
        Number of videos.
    num_frames, fps, height, width
        Passed to :func:`shapes_video` (``height`` and ``width`` even).
    seed
        Seed of the first video.

    Returns
    -------
    Path
        The annotation file.
    """
    from hermes_policy.inputs.video_writing import write_video

    if num_videos < 1:
        raise ValueError(f"num_videos must be at least 1, got {num_videos}")
    root = Path(folder)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(num_videos):
        video = shapes_video(num_frames, height=height, width=width, fps=fps, seed=seed + i)
        video_id = f"synthetic_{i:03d}"
        rel = f"videos/{video_id}.mp4"
        write_video(root / rel, video.frames, fps)
        entries.append(
            {
                "video_id": video_id,
                "video_path": rel,
                "duration": round(video.duration, 6),
                "conversations": [q.to_conversation() for q in video.questions],
            }
        )
    annotation = root / "annotations.json"
    write_text_atomic(annotation, json.dumps(entries, indent=2) + "\n")
    return annotation
