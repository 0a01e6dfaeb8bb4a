"""Fixed-shape answering (the code CUDA graphs replay) and fused pseudo-queries, against references.

``answer_path="static"`` runs exactly the code that is captured as CUDA graphs on a GPU, so
on the CPU it is checked against the ordinary per-token forward (``"eager"``). Fused
guidance (pseudo-queries riding in the chunk's forward) is checked against a separate pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_attention import RaggedTestRule

from hermes_policy import StreamingSession
from hermes_policy.errors import StreamError
from hermes_policy.graphs.answer_graphs import AnswerGraphs, bucket_length
from hermes_policy.graphs.chunk_graphs import batch_axis
from hermes_policy.options import RuntimeOptions
from hermes_policy.policy import ModelInfo, paper_default
from hermes_policy.retention import FifoRetention, FullRetention, HermesRetention


def text_frames(adapter, n, seed=0):
    return torch.randint(0, 250, (n, adapter.tokens_per_frame), generator=torch.Generator().manual_seed(seed))


def rules(adapter, budget):
    info = ModelInfo.of(adapter)
    return {
        "full": FullRetention(),
        "fifo": FifoRetention(budget=budget),
        "hermes": HermesRetention(policy=paper_default(info, budget=budget)),
        # eager re-indexing + summary tokens
        "hermes-eager": HermesRetention(policy=paper_default(info, budget=budget, reindex="eager")),
        # different tokens per layer, compacted: every layer at its own lengths and positions
        "ragged": RaggedTestRule(reindex="eager"),
    }


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 64, 65, 512, 513, 1100)] == [16, 16, 32, 64, 128, 512, 1024, 1536]


def test_batch_axis_of_1d_rope(tiny_adapter):
    assert batch_axis(tiny_adapter.rotary_emb, 1, torch.device("cpu"), torch.float32) == 0


@pytest.mark.parametrize("name", ["full", "fifo", "hermes", "hermes-eager", "ragged"])
def test_static_answers_equal_eager_answers(tiny_adapter, name):
    stream = text_frames(tiny_adapter, 24, seed=3)
    answers = {}
    for path in ("eager", "static"):
        session = StreamingSession(tiny_adapter, rules(tiny_adapter, 64)[name], chunk_frames=4, options=RuntimeOptions(answer_path=path))
        session.add_frames(stream)
        before = [session.store.layer(layer).keys.clone() for layer in range(tiny_adapter.num_layers)]
        lengths = session.store.lengths()
        first = session.ask("Where is the ball?", max_new_tokens=10)
        second = session.ask("And the cat?", max_new_tokens=10)
        assert session.store.lengths() == lengths  # the Q/A tokens left no trace
        for layer, keys in enumerate(before):
            assert torch.equal(session.store.layer(layer).keys, keys)
        answers[path] = (first.token_ids, second.token_ids)
        if name == "ragged":
            ends = {session.store.next_position(layer) for layer in range(tiny_adapter.num_layers)}
            assert len(ends) > 1, "the test needs layers at different positions"
    assert answers["static"] == answers["eager"]


@pytest.mark.parametrize("model", ["llava", "qwen2.5"])
def test_static_answers_equal_eager_answers_on_video_models(tmp_path, model):
    from tiny_llava_ov import IMAGE_SIZE, tiny_llava_onevision
    from tiny_qwen_vl import FRAME_HEIGHT, FRAME_WIDTH, tiny_qwen2_5_vl

    from hermes_policy.models import load_adapter

    if model == "llava":
        adapter = load_adapter(tiny_llava_onevision(tmp_path / model, layers=4), device="cpu")
        shape = (16, IMAGE_SIZE, IMAGE_SIZE, 3)
    else:
        adapter = load_adapter(tiny_qwen2_5_vl(tmp_path / model, layers=4), device="cpu")
        shape = (16, FRAME_HEIGHT, FRAME_WIDTH, 3)
    video = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    adapter.frames_piece(video[:4], 0)  # Qwen-VL knows its frame size after a first chunk
    rule = HermesRetention(policy=paper_default(ModelInfo.of(adapter), budget=6 * adapter.tokens_per_frame))
    answers = {}
    for path in ("eager", "static"):
        session = StreamingSession(adapter, rule, chunk_frames=4, options=RuntimeOptions(answer_path=path))
        session.add_frames(video)
        assert session.compressions > 0
        answers[path] = session.ask("What moved?", max_new_tokens=8).token_ids
    assert answers["static"] == answers["eager"]


def test_answer_path_is_validated(tiny_adapter):
    with pytest.raises(StreamError, match="answer_path"):
        StreamingSession(tiny_adapter, options=RuntimeOptions(answer_path="fast"))
    with pytest.raises(StreamError, match="CUDA"):
        StreamingSession(tiny_adapter, options=RuntimeOptions(answer_path="graphs"))
    with pytest.raises(ValueError, match="CUDA"):
        AnswerGraphs(tiny_adapter, StreamingSession(tiny_adapter).store, use_graphs=True)


@pytest.mark.parametrize("name", ["hermes", "hermes-eager"])
def test_fused_guidance_equals_a_separate_pass(tiny_adapter, name):
    stream = text_frames(tiny_adapter, 40, seed=4)
    stores = {}
    for fuse in (False, True):
        session = StreamingSession(tiny_adapter, rules(tiny_adapter, 48)[name], chunk_frames=4, fuse_guidance=fuse)
        session.add_frames(stream[:20])
        session.ask("What is new?", max_new_tokens=3)  # history rewrites the prompts
        session.add_frames(stream[20:])
        assert session.compressions > 0
        assert (session.fused_guidance_passes > 0) == fuse
        stores[fuse] = session.store
    separate, fused = stores[False], stores[True]
    assert separate.lengths() == fused.lengths()
    for layer in range(tiny_adapter.num_layers):
        assert torch.equal(separate.positions[layer], fused.positions[layer])
        assert torch.equal(separate.frame_index[layer], fused.frame_index[layer])
        torch.testing.assert_close(separate.layer(layer).keys, fused.layer(layer).keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(separate.layer(layer).values, fused.layer(layer).values, atol=1e-5, rtol=1e-5)


def test_static_answers_follow_a_growing_cache(tiny_adapter):
    """Under ``full`` the buffers grow (move) between questions; answers still equal eager ones."""
    stream = text_frames(tiny_adapter, 120, seed=6)
    answers = {}
    for path in ("eager", "static"):
        session = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=8, options=RuntimeOptions(answer_path=path))
        session.add_frames(stream[:16])
        first = session.ask("What came first?", max_new_tokens=6).token_ids
        generation = session.store.cache.generation
        session.add_frames(stream[16:])
        assert session.store.cache.generation != generation  # the buffers moved
        second = session.ask("What came last?", max_new_tokens=6).token_ids
        answers[path] = (first, second)
    assert answers["static"] == answers["eager"]


@pytest.mark.parametrize("fewer_kernels", [True, False])
def test_static_answers_attend_over_a_window_not_the_whole_buffer(tiny_adapter, monkeypatch, fewer_kernels):
    """Spare buffer capacity is not read: attention sees the slots the answer can reach."""
    from hermes_policy.attention import static as attention
    from hermes_policy.graphs import static_forward
    from hermes_policy.graphs.answer_graphs import WINDOW_QUANTUM

    stream = text_frames(tiny_adapter, 16, seed=7)
    seen: list[int] = []
    original = attention.grouped_masked_attention

    def spy(query, key, value, blocked, scaling):
        seen.append(key.shape[-2])
        return original(query, key, value, blocked, scaling)

    monkeypatch.setattr(attention, "grouped_masked_attention", spy)
    monkeypatch.setattr(static_forward, "grouped_masked_attention", spy)
    answers = {}
    for path in ("eager", "static"):
        session = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=8, options=RuntimeOptions(answer_path=path))
        session.answer_graphs = AnswerGraphs(tiny_adapter, session.store, use_graphs=False, fewer_kernels=fewer_kernels)
        session.add_frames(stream)
        for layer in session.store.cache.layers:  # lots of spare room, as after a fused pass
            layer.reserve(4 * WINDOW_QUANTUM + layer.capacity, *layer.buffers)
        seen.clear()
        answers[path] = session.ask("Where is the ball?", max_new_tokens=5).token_ids
    assert session.answer_graphs.fewer_kernels == fewer_kernels
    needed = max(session.store.lengths()) + 16 + 5
    window = -(-needed // WINDOW_QUANTUM) * WINDOW_QUANTUM
    assert seen and set(seen) == {window} and window < session.store.cache.layers[0].capacity
    assert answers["static"] == answers["eager"]


@pytest.mark.parametrize("failures", [1, 2])
def test_a_failed_answer_capture_is_tried_again(tiny_adapter, failures, monkeypatch):
    """A capture that fails (after its warm-up ran) answers that step without a graph, with
    the same tokens; the graph is captured again at its next use, and after
    MAX_CAPTURE_ATTEMPTS failures of one graph the answers run without graphs for good."""
    from hermes_policy.graphs import answer_graphs

    stream = text_frames(tiny_adapter, 16, seed=3)
    questions = ["Where is the ball?", "What moved?", "Where is the ball?"]
    plain = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=8, options=RuntimeOptions(answer_path="eager"))
    plain.add_frames(stream)
    # one token an answer: only the prefill graph of one (bucket, window), the same for all three
    expected = [plain.ask(q, max_new_tokens=1).token_ids for q in questions]
    session = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=8, options=RuntimeOptions(answer_path="static"))
    graphs = session.answer_graphs = AnswerGraphs(tiny_adapter, session.store, use_graphs=False)
    graphs.use_graphs = True  # through the capture branch (the graph itself is not needed on the CPU)
    tries: list[int] = []

    def capture(body):  # as AnswerGraphs._capture, without CUDA: warm-ups, state restored
        saved = (graphs._token.clone(), graphs._offset.clone())
        body()
        graphs._token.copy_(saved[0])
        graphs._offset.copy_(saved[1])
        tries.append(len(tries))
        if len(tries) <= failures:
            raise RuntimeError("operation failed due to a previous error during capture")
        graphs.captures += 1
        return answer_graphs._Graph(None, body)

    monkeypatch.setattr(graphs, "_capture", capture)
    session.add_frames(stream)
    with pytest.warns(UserWarning, match="CUDA graph capture failed") as warned:
        answers = [session.ask(q, max_new_tokens=1).token_ids for q in questions]
    assert answers == expected
    messages = [str(w.message) for w in warned if "capture failed" in str(w.message)]
    assert len(messages) == failures
    if failures == 1:  # the prefill graph failed once, then was captured at the next question
        assert "captured again at its next use" in messages[0] and graphs.use_graphs
        assert graphs.captures == 1 and len(tries) == 2  # the third question replays it
    else:  # the same graph failed twice: no graphs from then on
        assert "answering without graphs" in messages[1] and not graphs.use_graphs
        assert graphs.captures == 0 and len(tries) == 2


def test_warm_captures_the_graphs_the_next_answers_use(tiny_adapter, monkeypatch):
    """AnswerGraphs.warm captures exactly the (bucket, window) graphs later answers of those
    question lengths replay: those answers capture nothing more and equal eager answers; the
    store is left as it was. (Captures recorded without CUDA, as in the test above.)"""
    from hermes_policy.graphs import answer_graphs

    stream = text_frames(tiny_adapter, 24, seed=5)
    questions = ["Where is the ball?", "What moved just before the last frame, and where did it go?"]
    rule = lambda: HermesRetention(policy=paper_default(ModelInfo.of(tiny_adapter), budget=48))  # noqa: E731
    plain = StreamingSession(tiny_adapter, rule(), chunk_frames=8, options=RuntimeOptions(answer_path="eager"))
    plain.add_frames(stream)
    expected = [plain.ask(q, max_new_tokens=6).token_ids for q in questions]

    session = StreamingSession(tiny_adapter, rule(), chunk_frames=8, options=RuntimeOptions(answer_path="static"))
    session.add_frames(stream)
    graphs = session.answer_graphs = AnswerGraphs(tiny_adapter, session.store, use_graphs=False)
    graphs.use_graphs = True

    def capture(body):
        saved = (graphs._token.clone(), graphs._offset.clone())
        body()
        graphs._token.copy_(saved[0])
        graphs._offset.copy_(saved[1])
        graphs.captures += 1
        return answer_graphs._Graph(None, body)

    monkeypatch.setattr(graphs, "_capture", capture)
    lengths = session.store.lengths()
    lengths_of = [len(tiny_adapter.question_piece(q)) for q in questions]
    assert len({bucket_length(n) for n in lengths_of}) == 2  # two buckets
    assert graphs.warm(tuple(lengths_of), 6) == 4  # a prefill and a decode graph per bucket
    assert session.store.lengths() == lengths
    assert graphs.warm(tuple(lengths_of), 6) == 0
    answers = [session.ask(q, max_new_tokens=6).token_ids for q in questions]
    assert graphs.captures == 4  # the answers replayed what warm captured
    assert answers == expected
