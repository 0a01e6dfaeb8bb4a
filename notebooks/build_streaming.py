"""Writes ``02_streaming_policy.ipynb`` (without outputs) next to this file.

Run ``.venv/bin/python notebooks/build_streaming.py`` after editing the cells below; the
notebook is generated so that it stays reviewable and never carries outputs into git.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).with_name("02_streaming_policy.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Streaming under a memory budget: which tokens each layer keeps, and what it costs

A streaming model cannot keep every token of an endless stream: after each chunk of frames
a *retention rule* decides, layer by layer, which cached tokens stay. This notebook streams
one synthetic text stream through the embedded SmolLM2 under several rules **at the same
budget of stream tokens per layer**, and then

1. draws, for every rule, which frames each layer still holds at the end of the stream
   (and, for HERMES, how that picture builds up over time);
2. asks the stream's planted-fact questions under every rule and compares the answers,
   the log-probability of the known answer and the divergence from the full cache.

The rules:

| rule | keeps, in every layer |
| --- | --- |
| `full` | everything (the reference; it ignores the budget) |
| `fifo` | the newest tokens |
| `sink+recent` | the first few stream tokens (attention sinks) and the newest |
| `uniform` | tokens evenly spaced over the whole stream |
| `attention-only` | what a pseudo-query ("summarize the video...") attends to most at that layer |
| `hermes` | shallow layers: the newest; deep layers: what the pseudo-query attends to (anchors), with cross-layer smoothing and a summary token (METHOD.md sections 3-5) |

It runs on a CPU in a few minutes (less with fewer frames)."""),
    ("code", """\
# Parameters (the tests override them through the environment)
import os
import tempfile
from pathlib import Path

FRAMES = int(os.environ.get("HERMES_NOTEBOOK_FRAMES", "48"))  # frames of the synthetic stream
TOKENS_PER_FRAME = 48  # each text frame is cut or padded to this many tokens
# stream tokens each layer may keep; default: a third of the stream (768 tokens for 48 frames)
BUDGET = int(os.environ.get("HERMES_NOTEBOOK_BUDGET") or max(1, FRAMES // 3) * TOKENS_PER_FRAME)
CHUNK_FRAMES = 4  # frames ingested together; the rule runs after every chunk
MAX_NEW_TOKENS = 16  # answer length limit
SEED = 0  # seed of the synthetic stream
POLICY_PATH = os.environ.get("HERMES_NOTEBOOK_POLICY")  # a probed policy.json (notebook 01), optional
OUT = Path(os.environ.get("HERMES_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="hermes-streaming-"))
print(f"{FRAMES} frames of {TOKENS_PER_FRAME} tokens ({FRAMES * TOKENS_PER_FRAME} stream tokens), "
      f"budget {BUDGET} tokens per layer; outputs go to {OUT}")"""),
    ("code", """\
%matplotlib inline
import dataclasses
import re
import time

import pandas as pd
import torch

from hermes_policy import StreamingSession
from hermes_policy.errors import HermesError
from hermes_policy.evaluation.visualize import (
    kept_frame_share,
    kept_frame_snapshots,
    plot_kept_frames,
)
from hermes_policy.inputs.synthetic_text import text_stream
from hermes_policy.models import load_adapter
from hermes_policy.policy import ModelInfo, Policy, paper_default, paper_tiers, split_budget
from hermes_policy.retention import (
    AttentionRetention,
    FifoRetention,
    FullRetention,
    HermesRetention,
    SinkRecentRetention,
    UniformRetention,
)

(OUT / "figures").mkdir(parents=True, exist_ok=True)"""),
    ("md", """\
## 1. The model and the stream

`load_adapter(None, ...)` loads the SmolLM2-135M-Instruct that ships with the project. A
"frame" is one sentence of a scene description, cut or padded to 48 tokens. A few frames
carry a planted fact (a secret code word early in the stream, a name, a number, a hiding
place, a kite seen several times); every question below asks about one of them, **after
the whole stream**, so the older the fact, the longer a rule must have held on to it."""),
    ("code", """\
adapter = load_adapter(None, device="cpu", tokens_per_frame=TOKENS_PER_FRAME)
stream = text_stream(FRAMES, seed=SEED)
FACT_FRAMES = sorted({fact.frame for fact in stream.facts})
print(f"{adapter.name_or_path}: {adapter.num_layers} layers; stream of {len(stream)} frames")
print("first frame:", stream.frames[0])
print()
for fact in stream.facts:
    print(f"frame {fact.frame:3d}: {fact.sentence}")"""),
    ("md", """\
## 2. Stream it under every rule at one budget

Every rule except `full` may keep `BUDGET` stream tokens per layer (the system prompt is
never evicted). The HERMES rule uses the paper's default policy for this model's depth
(10% sensory, 60% working, 30% long-term layers); if `HERMES_NOTEBOOK_POLICY` points to a
policy probed from this model (`policy.json` written by notebook 01 or by `hermes-probe
analyze`), it is added as `hermes (probed)`, its per-layer budgets rescaled to the same
total. Frames go in chunk by chunk; after each chunk we record which frames each layer
holds, to watch HERMES' memory form."""),
    ("code", """\
def equal_budget(policy: Policy, budget: int) -> Policy:
    \"\"\"The same policy with per-layer budgets rescaled to `budget` tokens per layer on average.\"\"\"
    budgets = split_budget([entry.budget for entry in policy.layers], budget)
    layers = [dataclasses.replace(entry, budget=b) for entry, b in zip(policy.layers, budgets)]
    return dataclasses.replace(policy, budget=budget, layers=layers)


rules = {
    "full": FullRetention(),
    "fifo": FifoRetention(budget=BUDGET),
    "sink+recent": SinkRecentRetention(budget=BUDGET),
    "uniform": UniformRetention(budget=BUDGET),
    "attention-only": AttentionRetention(budget=BUDGET),
    "hermes": HermesRetention(policy=paper_default(ModelInfo.of(adapter), budget=BUDGET)),
}
if POLICY_PATH:
    try:
        probed = equal_budget(Policy.load(POLICY_PATH), BUDGET)
        rule = HermesRetention(policy=probed)
        rule.validate(adapter)
        rules["hermes (probed)"] = rule
        print(f"probed policy from {POLICY_PATH}: tiers {dict(probed.tiers)}")
    except (HermesError, ValueError) as error:
        print(f"the policy at {POLICY_PATH} cannot be used with this model, skipped: {error}")
else:
    print("no probed policy (set HERMES_NOTEBOOK_POLICY to a policy.json to add one)")"""),
    ("code", """\
sessions: dict[str, StreamingSession] = {}
snapshots: dict[str, list] = {}  # rule -> [(frames seen, kept share (layers, frames)), ...]
for name, rule in rules.items():
    start = time.perf_counter()
    session = StreamingSession(adapter, rule, chunk_frames=CHUNK_FRAMES, max_new_tokens=MAX_NEW_TOKENS)
    history = []
    for first in range(0, FRAMES, CHUNK_FRAMES):
        chunk = slice(first, first + CHUNK_FRAMES)
        session.add_frames(stream.frames[chunk], timestamps=stream.timestamps[chunk])
        session.flush()  # a short last chunk goes in too
        history.append((session.frames_seen, kept_frame_share(session, FRAMES)))
    sessions[name], snapshots[name] = session, history
    kept = session.tokens_kept
    print(f"{name:16s} {time.perf_counter() - start:5.1f} s  stream tokens per layer "
          f"{min(kept)}-{max(kept)}  compressions {session.compressions:2d}  "
          f"pseudo-query passes {session.guidance_passes:2d}")"""),
    ("md", """\
## 3. Which frames each layer holds at the end of the stream

One panel per rule: rows are layers (layer 0, the shallowest, on top), columns frames
(oldest on the left); the colour is the share of the frame's 48 tokens that the layer still
holds. Triangles mark the frames with planted facts.

**What to look for:**

- `fifo` is a hard edge: all layers hold the newest frames in full and nothing older, so
  facts from the first part of the stream are gone everywhere; `sink+recent` is the same
  plus a sliver of the first frame.
- `uniform` keeps the same thin share of every frame in every layer: nothing is lost
  entirely, nothing is kept whole.
- `attention-only` keeps scattered tokens chosen by the pseudo-query, independently per
  layer.
- `hermes` changes with depth: the **shallow (sensory) layers look like fifo** (the newest
  frames in full), the **deep (long-term) layers hold a few tokens of every frame** (the
  anchors the pseudo-query attends to, plus one summary token of everything evicted, not
  drawn), and the working layers sit in between: a window of recent frames that narrows
  with depth, plus scattered older tokens. Cross-layer smoothing (deep to shallow) lets
  some old tokens that deep layers value survive in shallower layers too."""),
    ("code", """\
fig = plot_kept_frames(sessions, FRAMES, highlight=FACT_FRAMES,
                       title=f"Share of each frame's tokens held per layer after {FRAMES} frames "
                             f"(budget {BUDGET} tokens per layer)")
fig.savefig(OUT / "figures" / "kept_frames.png", dpi=110)
fig"""),
    ("md", """\
The same in numbers: per tier of the paper's split, the share of held stream tokens that
come from frames **older than the newest `BUDGET` tokens' worth** (what fifo has already
dropped; `full` shows how much of the stream that is). fifo is 0 everywhere and uniform the
same in every tier; for HERMES the share should **rise with depth**, lowest in the sensory
tier and highest in the long-term tier."""),
    ("code", """\
recent_frames = BUDGET // TOKENS_PER_FRAME
tiers = paper_tiers(adapter.num_layers)
rows = {}
for name, session in sessions.items():
    share = kept_frame_share(session, FRAMES)
    old = share[:, : FRAMES - recent_frames].sum(axis=1)
    total = share.sum(axis=1)
    rows[name] = {f"{tier} (layers {a}-{b})": float(old[a : b + 1].sum() / total[a : b + 1].sum())
                  for tier, (a, b) in tiers.items()}
old_share = pd.DataFrame(rows).T
print(f"share of held tokens from frames before the newest {recent_frames}")
old_share.style.format("{:.0%}")"""),
    ("md", """\
## 4. HERMES' memory over time

Snapshots of the `hermes` panel after successive chunks (grey: frames not streamed yet).
Until the budget is reached every layer holds everything; from then on the shallow layers
slide along with the stream while the deep layers thin out the past evenly, keeping
anchors of every frame."""),
    ("code", """\
fig = plot_kept_frames(kept_frame_snapshots(snapshots["hermes"], most=6), FRAMES,
                       highlight=FACT_FRAMES, ncols=3,
                       title="hermes (paper default): which frames each layer holds, over time")
fig.savefig(OUT / "figures" / "hermes_over_time.png", dpi=110)
fig"""),
    ("md", """\
## 5. Answers under every rule

Each planted-fact question is asked under every rule at the end of the stream. Columns:

- `answer`: greedy decoding (at most `MAX_NEW_TOKENS` tokens); `correct`: it contains the
  known answer as whole words, ignoring case and punctuation (a number may also be written
  as a word: "2", "two" or "twice");
- `log p(answer)`: log-probability of the known answer as the first words of the reply
  (teacher-forced); higher is better, comparable across rules for the same question. The
  reply starts right after the chat template's `assistant` line, so the answer is scored
  without a leading space: a leading-space token there is so unlikely under every rule that
  it would drown the difference between remembering and not;
- `KL vs full`: KL divergence (nats) of the next-token distribution from the full cache's,
  `KL(full || rule)`: 0 means the rule answers the first token exactly as if it remembered
  everything.

Asking leaves no trace in the cache, so every rule answers from the same state."""),
    ("code", """\
NUMBER_WORDS = {"1": ["one", "once"], "2": ["two", "twice"], "3": ["three", "thrice"], "4": ["four"],
                "5": ["five"], "6": ["six"], "7": ["seven"], "8": ["eight"], "9": ["nine"]}


def words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def contains_answer(text: str, answer: str) -> bool:
    \"\"\"The known answer (or its number word) appears in `text` as whole words.\"\"\"
    return any(words(option) in words(text) for option in [answer, *NUMBER_WORDS.get(answer, [])])


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    \"\"\"KL(reference || logits) in nats, over the vocabulary.\"\"\"
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(logits, -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


reference = {q.question: sessions["full"].next_token_logits(q.question) for q in stream.questions}
records = []
start = time.perf_counter()
for name, session in sessions.items():
    for q in stream.questions:
        answer = session.ask(q.question)
        records.append({
            "rule": name,
            "question": q.question,
            "fact frame": q.frame,
            "expected": q.answer,
            "answer": answer.text.strip(),
            "correct": contains_answer(answer.text, q.answer),
            "log p(answer)": session.answer_logprob(q.question, q.answer),
            "KL vs full": kl_from(reference[q.question], session.next_token_logits(q.question)),
        })
answers = pd.DataFrame(records)
answers.to_csv(OUT / "answers.csv", index=False)
print(f"{len(records)} answers in {time.perf_counter() - start:.0f} s")
pd.set_option("display.max_colwidth", 60)
answers.style.format({"log p(answer)": "{:.2f}", "KL vs full": "{:.3f}"}).hide(axis="index")"""),
    ("md", """\
Per rule: how many answers contain the fact, the mean log-probability of the known
answers and the mean divergence from the full cache. Then the log-probabilities question
by question (columns ordered by the age of the fact, oldest first): **fifo and
sink+recent should fall off on the early facts**, which they no longer hold in any
layer."""),
    ("code", """\
summary = answers.groupby("rule", sort=False).agg(
    correct=("correct", "sum"),
    mean_log_p=("log p(answer)", "mean"),
    mean_kl_vs_full=("KL vs full", "mean"),
)
summary["correct"] = summary["correct"].astype(int).astype(str) + f" / {len(stream.questions)}"
display(summary.style.format({"mean_log_p": "{:.2f}", "mean_kl_vs_full": "{:.3f}"}))

order = sorted(stream.questions, key=lambda q: q.frame)
by_question = answers.pivot(index="rule", columns="question", values="log p(answer)")
by_question = by_question.loc[list(sessions), [q.question for q in order]]
by_question.columns = [f"frame {q.frame}: {q.question}" for q in order]
by_question.style.format("{:.2f}").background_gradient(axis=0, cmap="viridis")"""),
    ("md", """\
## 6. Reading the results

- `full` is the reference; every other rule holds `BUDGET` stream tokens per layer (a
  third of the stream by default).
- **fifo forgets early facts**: the code word sits in the first quarter of the stream, far
  outside fifo's window, so fifo (and sink+recent) can only guess; on those questions their
  log-probability of the known answer drops and their next-token distribution drifts from
  the full cache's. Facts from the newest frames are still held whole, and there fifo
  scores about like the full cache.
- **HERMES keeps anchors in deep layers and recent tokens in shallow ones**: its shallow
  layers spend their budget on the newest frames like fifo, while its deep layers keep a
  few tokens of every frame, so no part of the stream is dropped from every layer.
- Holding some of a fact's tokens in some layers is not the same as answering from it:
  compare each question's fact frame (its column in the panels above) with the answers;
  a rule that thins every frame (uniform, the deep layers of attention-only and HERMES)
  can also lose details of recent facts that fifo still holds whole.
- A 135M-parameter text model on a short synthetic stream is a small, noisy test bed: read
  the tables for tendencies, not for a ranking (the benchmarks use real streaming-QA data).
- Outputs written to `OUT`: `figures/kept_frames.png`, `figures/hermes_over_time.png`
  and `answers.csv`."""),
    ("code", """\
for path in sorted(OUT.rglob("*")):
    if path.is_file():
        print("wrote", path.relative_to(OUT))"""),
]


def build() -> nbformat.NotebookNode:
    cells = []
    for index, (kind, source) in enumerate(CELLS):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(source, id=f"streaming-{index:02d}")
        if index == 1:
            cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.validate(notebook)
    return notebook


def main() -> Path:
    nbformat.write(build(), NOTEBOOK)
    return NOTEBOOK


if __name__ == "__main__":
    print(f"wrote {main()}")
