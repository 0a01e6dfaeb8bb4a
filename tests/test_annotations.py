"""Streaming-QA annotation files: accepted variants and clear errors naming the entry."""

from __future__ import annotations

import json
import math

import pytest

from hermes_policy.inputs.annotations import AnnotationError, load_annotations


def write(tmp_path, data):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_variants(tmp_path):
    path = write(tmp_path, [
        {"video_id": "v1", "video_path": "videos/a.mp4", "duration": 30,
         "conversations": [
             {"question": "Later?", "answer": "yes", "end_time": 20.5, "task": "recall"},
             {"question": "What colour?", "choices": ["red", "blue"], "answer": "red", "end_time": 3},
             {"question": "Overall?", "answer": "fine", "question_type": "summary"},
         ]},
        {"id": 7, "video": "/abs/b.mp4", "conversations": [{"question": "Q", "options": ["a", "b", "c"]}]},
    ])
    v1, v2 = load_annotations(path)
    assert v1.video_path == tmp_path / "videos/a.mp4" and v1.duration == 30.0
    assert [q.question for q in v1.questions] == ["What colour?", "Later?", "Overall?"]  # time order
    assert v1.questions[0].choices == ("red", "blue")
    assert v1.questions[2].task == "summary" and math.isinf(v1.questions[2].ask_after)
    assert v2.video_id == "7" and str(v2.video_path) == "/abs/b.mp4" and v2.questions[0].answer is None
    assert load_annotations(path, video_root="/data")[0].video_path.as_posix() == "/data/videos/a.mp4"
    assert load_annotations(write(tmp_path, {"videos": [
        {"video_id": "x", "video_path": "x.mp4", "conversations": [{"question": "Q"}]}]}))[0].video_id == "x"


@pytest.mark.parametrize(
    "data,message",
    [
        ([], "holds no videos"),
        ({"a": 1}, "expected a JSON list"),
        ([{"video_path": "a.mp4", "conversations": [{"question": "Q"}]}], "entry 0 is missing 'video_id'"),
        ([{"video_id": "v", "conversations": [{"question": "Q"}]}], r"entry 0 \(video_id 'v'\) is missing 'video_path'"),
        ([{"video_id": "v", "video_path": "a.mp4"}], "non-empty list 'conversations'"),
        ([{"video_id": "v", "video_path": "a.mp4", "conversations": [{"answer": "x"}]}],
         "conversation 0 is missing 'question'"),
        ([{"video_id": "v", "video_path": "a.mp4", "conversations": [{"question": "Q", "end_time": -1}]}],
         "end_time"),
        ([{"video_id": "v", "video_path": "a.mp4", "conversations": [{"question": "Q", "choices": ["only"]}]}],
         "choices"),
    ],
)
def test_malformed(tmp_path, data, message):
    with pytest.raises(AnnotationError, match=message):
        load_annotations(write(tmp_path, data))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        load_annotations(tmp_path / "bad.json")
