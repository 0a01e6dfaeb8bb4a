"""Fidelity tasks for text-frame models: streams whose probes the full cache can answer.

One stream per seed carries three kinds of probe, all asked once the whole stream has been
seen (so a probe's *age*, how far back its evidence lies, is what varies):

* ``kv``: key-value recall. Frames hold ``"The code for locker 4821 is glacier."``; the
  probe continues the stream with ``"The code for locker 4821 is"`` and scores the value's
  tokens, teacher-forced. Exact: every value token is the model's top-1.
* ``copy``: copying a planted span. The probe repeats a filler frame's first
  ``copy_prompt`` tokens and scores its next ``copy_span`` tokens, teacher-forced.
  Accuracy: the share of span tokens that are the model's top-1.
* ``facts``: the planted-fact questions of :func:`~hermes_policy.inputs.synthetic_text.text_stream`,
  asked in the chat format, with the answer scored after a lead that ends right before
  the value (``"The secret code word is '"`` -> ``glacier``), so log p measures the value
  and not the phrasing. Multiple choice where the question has choices (the choice with
  the highest log p), exact top-1 otherwise.

Each probe is labelled ``early`` / ``middle`` / ``recent`` by the third of the stream its
evidence lies in; evidence frames are spread evenly, so every stream tests both memory and
recency.

Video models get one task through the synthetic shapes video
(:func:`~hermes_policy.inputs.synthetic_shapes.shapes_video`):

* ``scene``: the video's questions whose answer still holds after the last frame (the
  steady shape's colour and lane, the shape that appeared late, the colour the changing
  shape had before it changed and has now, how many shapes are on screen), asked in the
  chat format after the lead ``"The answer is"`` and scored as multiple choice. A probe's
  position is that of the latest frame showing its evidence: the end for what is still on
  screen (the steady shape, the count, the colour now), a third in for the late shape's
  appearance, two thirds in for the colour before the change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hermes_policy.inputs.synthetic_shapes import shapes_video
from hermes_policy.inputs.synthetic_text import scene_sentence, text_stream

TASKS: tuple[str, ...] = ("kv", "copy", "facts")
VIDEO_TASKS: tuple[str, ...] = ("scene",)

# values of the key-value task: common single words, distinct from the stream's fillers
KV_VALUES: tuple[str, ...] = (
    "glacier", "lantern", "harbor", "violet", "compass", "meadow", "saffron", "ember",
    "falcon", "marble", "orchid", "canyon", "pepper", "walnut", "thunder", "crystal",
    "velvet", "copper", "island", "sparrow", "cactus", "lemon", "anchor", "timber",
    "rocket", "pebble", "dragon", "bamboo", "magnet", "olive", "tulip", "zebra",
)

# chat-format leads ending right before each planted fact's value
FACT_LEADS: dict[str, str] = {
    "code_word": "The secret code word is '",
    "name": "The woman's name is",
    "number": "The number of green boxes is",
    "place": "He hid the silver key",
    "count": "The yellow kite drifted across the sky this many times:",
}


@dataclass
class Probe:
    """One scored question.

    Attributes
    ----------
    task : ``kv``, ``copy`` or ``facts``
    prompt : text after the stream (``mode="raw"``) or the chat question (``mode="chat"``)
    answer : the expected continuation's text (for display)
    mode : ``raw`` continues the stream's text; ``chat`` closes the user turn with the
        question and opens the answer (the adapter's ``question_piece``)
    lead : for ``chat`` probes, answer text forced before the scored tokens
    prompt_ids : for ``raw`` probes, token ids of the prompt when given directly (copy)
    answer_ids : token ids scored, teacher-forced
    choices : token ids of every option (multiple choice), the right one included
    correct_choice : index of the right option in ``choices``
    frame : the frame holding the evidence
    position : ``early`` / ``middle`` / ``recent``
    """

    task: str
    prompt: str
    answer: str
    mode: str
    answer_ids: list[int]
    frame: int
    position: str
    lead: str = ""
    prompt_ids: list[int] | None = None
    choices: list[list[int]] | None = None
    correct_choice: int | None = None


@dataclass
class FidelityStream:
    """Frames plus the probes asked after the last frame."""

    frames: list[str] | np.ndarray  # text frames, or uint8 (T, H, W, 3) video frames
    probes: list[Probe]
    seed: int
    facts: dict[int, str] = field(default_factory=dict)  # frame -> kind of evidence it holds

    def by_task(self, task: str) -> list[Probe]:
        return [p for p in self.probes if p.task == task]


def position_of(frame: int, num_frames: int) -> str:
    """``early`` / ``middle`` / ``recent``: the third of the stream ``frame`` lies in."""
    third = frame * 3 // max(num_frames, 1)
    return ("early", "middle", "recent")[min(third, 2)]


def spread_frames(candidates: list[int], count: int, rng: np.random.Generator) -> list[int]:
    """``count`` of ``candidates`` spread evenly over their range (one per equal stratum)."""
    if count >= len(candidates):
        return sorted(candidates)
    edges = np.linspace(0, len(candidates), count + 1).astype(int)
    return sorted(candidates[int(rng.integers(a, max(a + 1, b)))] for a, b in zip(edges[:-1], edges[1:], strict=True))


def fidelity_stream(
    num_frames: int,
    seed: int,
    frame_ids: Callable[[str], list[int]],
    encode: Callable[[str], list[int]],
    *,
    kv_facts: int = 16,
    copy_probes: int = 16,
    copy_prompt: int = 12,
    copy_span: int = 16,
    tasks: tuple[str, ...] = TASKS,
) -> FidelityStream:
    """Build one seed's stream and its probes.

    Parameters
    ----------
    num_frames : frames ``T`` of the stream
    seed : same seed, same stream
    frame_ids : one frame's token ids as the model streams it (cut/padded to N tokens)
    encode : plain text -> token ids (no special tokens)
    kv_facts : key-value frames planted (spread evenly; at most the free frames)
    copy_probes : copy probes (filler frames, spread evenly)
    copy_prompt, copy_span : tokens repeated / scored by a copy probe
    tasks : which tasks' probes to keep

    Returns
    -------
    FidelityStream
    """
    base = text_stream(num_frames, seed=seed)
    rng = np.random.default_rng(10_000 + seed)
    frames = list(base.frames)
    taken = {f.frame: f.kind for f in base.facts}
    free = [i for i in range(num_frames) if i not in taken]
    probes: list[Probe] = []

    if "kv" in tasks and kv_facts:
        kv_frames = spread_frames(free, min(kv_facts, len(free) // 2), rng)
        keys = rng.choice(np.arange(1000, 10000), size=len(kv_frames), replace=False)
        values = rng.permutation(len(KV_VALUES))
        for n, frame in enumerate(kv_frames):
            key, value = int(keys[n]), KV_VALUES[int(values[n % len(KV_VALUES)])]
            frames[frame] = f"Second {frame}: The code for locker {key} is {value}. Meanwhile, {scene_sentence(rng, capital=False)}"
            taken[frame] = "kv"
            probes.append(Probe(
                task="kv", prompt=f"\nThe code for locker {key} is", answer=f" {value}", mode="raw",
                answer_ids=encode(f" {value}"), frame=frame, position=position_of(frame, num_frames),
            ))

    if "copy" in tasks and copy_probes:
        per_frame = len(frame_ids(""))  # frames are cut/padded to this many tokens
        if copy_prompt + copy_span > per_frame:  # short frames: a third repeated, the rest scored
            copy_prompt = max(1, per_frame // 3)
            copy_span = max(1, per_frame - copy_prompt)
        fillers = [i for i in range(num_frames) if i not in taken]
        usable = [i for i in fillers if len(set(frame_ids(frames[i])[: copy_prompt + copy_span])) > copy_prompt
                  and len(encode(frames[i])) >= copy_prompt + copy_span]
        for frame in spread_frames(usable, copy_probes, rng):
            ids = frame_ids(frames[frame])
            probes.append(Probe(
                task="copy", prompt=frames[frame], answer="", mode="raw", prompt_ids=ids[:copy_prompt],
                answer_ids=ids[copy_prompt : copy_prompt + copy_span], frame=frame,
                position=position_of(frame, num_frames),
            ))
            taken[frame] = "copy"

    if "facts" in tasks:
        for q in base.questions:
            lead = FACT_LEADS.get(q.kind, "The answer is")
            sep = "" if lead.endswith("'") else " "
            answer = q.answer if q.kind != "place" else q.answer
            choices = None
            correct = None
            if q.choices is not None:
                choices = [encode(sep + c) for c in q.choices]
                correct = q.choices.index(q.answer)
            probes.append(Probe(
                task="facts", prompt=q.question, answer=answer, mode="chat", lead=lead,
                answer_ids=encode(sep + answer), frame=q.frame, position=position_of(q.frame, num_frames),
                choices=choices, correct_choice=correct,
            ))
    return FidelityStream(frames=frames, probes=probes, seed=seed, facts=taken)


__all__ = ["FACT_LEADS", "KV_VALUES", "TASKS", "FidelityStream", "Probe", "fidelity_stream", "position_of",
           "spread_frames"]


def video_fidelity_stream(
    num_frames: int,
    seed: int,
    encode: Callable[[str], list[int]],
    *,
    height: int = 224,
    width: int = 224,
) -> FidelityStream:
    """One seed's shapes video (``frames``: uint8 ``(T, H, W, 3)``) and its ``scene`` probes.

    Only the video's questions still true after the last frame are kept (see the module
    docstring); each is multiple choice over its options, answered after ``"The answer is"``.
    """
    video = shapes_video(num_frames, height=height, width=width, seed=seed)
    last = num_frames - 1
    lead = "The answer is"
    probes = []
    for q in video.questions:
        # answers about an earlier "now" may have changed by the end; the rest still hold
        holds = q.frame == last or q.kind in ("position", "appear") or (q.kind == "color" and q.frame == 0)
        if not holds or q.choices is None:
            continue
        # the latest frame that shows the evidence: steady shapes and "now" are in the last
        # frame; the colour before the change ends at change_frame - 1; the appearance is
        # seen around appear_frame
        evidence = {"color_change": video.change_frame - 1, "appear": video.appear_frame}.get(q.kind, last)
        probes.append(Probe(
            task="scene", prompt=q.question, answer=q.answer, mode="chat", lead=lead,
            answer_ids=encode(" " + q.answer), frame=evidence, position=position_of(evidence, num_frames),
            choices=[encode(" " + c) for c in q.choices], correct_choice=q.choices.index(q.answer),
        ))
    return FidelityStream(frames=video.frames, probes=probes, seed=seed, facts={p.frame: "scene" for p in probes})
