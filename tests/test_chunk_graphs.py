"""Ingest forwards on fixed buffers (the code CUDA graphs replay), against the ordinary path.

``ChunkGraphs(use_graphs=False)`` runs exactly the body that is captured on a GPU: static
input buffers, per-layer rotary computed from a positions buffer, keys written at each
layer's recorded length, lengths advanced by hand afterwards, collected pseudo-query
attention handed back. On the CPU it must give the ordinary session's results: the same
kept tokens, the same cache, the same answers.
"""

from __future__ import annotations

import pytest
import torch
from test_answer_paths import rules, text_frames

from hermes_policy import StreamingSession
from hermes_policy.errors import StreamError
from hermes_policy.graphs.chunk_graphs import ChunkGraphs
from hermes_policy.options import RuntimeOptions


def run_stream(adapter, name, fixed_buffers, frames=48, chunk=4, budget=64, after=1, fewer_kernels=True):
    session = StreamingSession(adapter, rules(adapter, budget)[name], chunk_frames=chunk, options=RuntimeOptions(answer_path="static"))
    if fixed_buffers:
        session.chunk_graphs = ChunkGraphs(
            adapter, session.store, use_graphs=False, after=after, fewer_kernels=fewer_kernels
        )
    stream = text_frames(adapter, frames, seed=5)
    half = frames // 2
    session.add_frames(stream[:half])
    first = session.ask("Where is the ball?", max_new_tokens=6)
    session.add_frames(stream[half:])  # the pseudo-queries now quote the question: new shapes
    second = session.ask("And the cat?", max_new_tokens=6)
    return session, [first.token_ids, second.token_ids]


@pytest.mark.parametrize(
    "name,after",
    # ragged: every layer at its own length and positions, a new shape each chunk (so
    # built at first sight here)
    [("fifo", 1), ("hermes", 1), ("hermes-eager", 1), ("ragged", 0)],
)
# the decoder in fewer kernels (static_forward.chunk_text_forward) or the transformers forward
@pytest.mark.parametrize("fewer_kernels", [True, False])
def test_fixed_buffer_ingest_equals_ordinary_ingest(tiny_adapter, name, after, fewer_kernels):
    plain, plain_answers = run_stream(tiny_adapter, name, fixed_buffers=False)
    fixed, fixed_answers = run_stream(tiny_adapter, name, fixed_buffers=True, after=after, fewer_kernels=fewer_kernels)
    graphs = fixed.chunk_graphs
    assert graphs.fewer_kernels == fewer_kernels
    assert graphs.replays > 0  # the steady state ran from fixed buffers
    assert fixed_answers == plain_answers
    assert fixed.store.lengths() == plain.store.lengths()
    for layer in range(tiny_adapter.num_layers):
        a, b = plain.store.layer(layer), fixed.store.layer(layer)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.frame_index, b.frame_index)
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)


def test_fused_pseudo_queries_replayed_from_fixed_buffers(tiny_adapter):
    """Compressing chunks (chunk plus pseudo-query blocks, attention collected) take the
    fixed-buffer path too, and the collected attention drives the same evictions."""
    fixed, _ = run_stream(tiny_adapter, "hermes", fixed_buffers=True)
    keys = list(fixed.chunk_graphs._graphs)
    # the context part of a key: (blocks, lead read, captured rows, steady); a chunk (lead)
    # with the pseudo-query blocks behind it
    assert any(key[3] and key[3][0] is not None and key[3][0][0] > 0 for key in keys)
    assert fixed.fused_guidance_passes > 0


def test_shapes_run_eagerly_until_they_recur(tiny_adapter):
    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 64)["fifo"], chunk_frames=4, options=RuntimeOptions(answer_path="static"))
    graphs = session.chunk_graphs = ChunkGraphs(tiny_adapter, session.store, use_graphs=False, after=3)
    stream = text_frames(tiny_adapter, 64, seed=6)
    for start in range(0, 64, 4):
        session.add_frames(stream[start : start + 4])
    # fifo at its budget: one shape per chunk, built on its fourth call
    assert len(graphs._graphs) == 1 and sum(graphs._shapes.counts.values()) >= 3
    assert graphs.replays >= 1


@pytest.mark.parametrize("name", ["fifo", "hermes"])
def test_a_full_chunk_at_the_budget_is_built_at_first_sight(tiny_adapter, name):
    """Once every layer holds its budget, a full chunk's shape recurs (its compression
    brings the cache back to the same lengths): it is built on its first call, while the
    growing cache before and a short chunk wait for the shape counter."""
    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 64)[name], chunk_frames=4, options=RuntimeOptions(answer_path="static"))
    graphs = session.chunk_graphs = ChunkGraphs(tiny_adapter, session.store, use_graphs=False, after=3)
    stream = text_frames(tiny_adapter, 64, seed=6)
    runs = []
    for start in range(0, 40, 4):
        at_budget = session._at_budget()
        before = graphs.replays
        session.add_frames(stream[start : start + 4])
        runs.append((at_budget, graphs.replays - before))
    assert not runs[0][0] and any(at_budget for at_budget, _ in runs)
    # every chunk met at the budget ran from fixed buffers, the first one included
    assert all(ran == 1 for at_budget, ran in runs if at_budget)
    assert all(ran == 0 for at_budget, ran in runs if not at_budget)
    assert session._at_budget()
    session.add_frames(stream[40:42])
    session.flush()  # a short chunk: not a recurring shape
    assert graphs.replays == sum(ran for _, ran in runs)


def test_graphs_are_dropped_when_a_buffer_moves(tiny_adapter):
    """A graph holds the cache buffers' addresses: once any layer's buffer grows (an answer
    reserving room, say), no graph built before may run again."""
    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 64)["fifo"], chunk_frames=4, options=RuntimeOptions(answer_path="static"))
    graphs = session.chunk_graphs = ChunkGraphs(tiny_adapter, session.store, use_graphs=False, after=1)
    stream = text_frames(tiny_adapter, 40, seed=6)
    for start in range(0, 32, 4):
        session.add_frames(stream[start : start + 4])
    assert len(graphs._graphs) == 1
    layer = session.store.cache.layers[0]
    layer.reserve(layer.capacity + 1, *layer.buffers)  # the buffer moves
    replays = graphs.replays
    session.add_frames(stream[32:36])  # this shape has recurred: rebuilt, not replayed stale
    assert graphs.replays == replays + 1 and len(graphs._graphs) == 1
    assert graphs._generation == session.store.cache.generation


def test_growing_cache_never_builds(tiny_adapter):
    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 64)["full"], chunk_frames=4, options=RuntimeOptions(answer_path="static"))
    graphs = session.chunk_graphs = ChunkGraphs(tiny_adapter, session.store, use_graphs=False)
    session.add_frames(text_frames(tiny_adapter, 32, seed=7))
    assert graphs.replays == 0 and not graphs._graphs


def test_ingest_graphs_need_cuda(tiny_adapter):
    with pytest.raises(StreamError, match="CUDA"):
        StreamingSession(tiny_adapter, options=RuntimeOptions(ingest_graphs=True))
    with pytest.raises(ValueError, match="CUDA"):
        ChunkGraphs(tiny_adapter, StreamingSession(tiny_adapter).store, use_graphs=True)


def test_pad_piece():
    from hermes_policy.models.base import StreamPiece
    from hermes_policy.retention.guidance import pad_piece

    piece = StreamPiece.text([5, 6, 7], axes=3)
    padded = pad_piece(piece, 4)
    assert padded.input_ids.tolist() == [5, 6, 7, 7]
    assert padded.positions.tolist() == [[0, 1, 2, 3]] * 3 and padded.frame_index.tolist() == [-1] * 4
    assert pad_piece(padded, 4) is padded and len(pad_piece(piece, 16)) == 16


def test_padded_prompts_leave_the_pseudo_query_attention_unchanged(tiny_adapter):
    """Pseudo-queries padded to a multiple of 16 tokens (stable graph shapes) against the
    same prompts unpadded, alone and fused with a chunk."""
    results = {}
    for quantum in (1, 16):
        session = StreamingSession(
            tiny_adapter, rules(tiny_adapter, 64)["hermes"], chunk_frames=4, options=RuntimeOptions(answer_path="static")
        )
        session.planner.quantum = quantum
        session.add_frames(text_frames(tiny_adapter, 12, seed=8))
        request = session.retention.guidance(session.store, [("Where is it?", "On the table.")])
        lead = tiny_adapter.frames_piece(text_frames(tiny_adapter, 4, seed=9), session.frames_seen)
        lengths = session.store.lengths()
        results[quantum] = (session.guidance_attention(request), session.guidance_attention(request, lead=lead))
        assert session.store.lengths() == [n + len(lead) for n in lengths]  # the lead stays, the prompts go
    for unpadded, padded in zip(results[1], results[16], strict=True):  # alone, then fused
        assert any(a is not None for a in unpadded)
        for a, b in zip(unpadded, padded, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_prompts_of_one_padded_length_share_a_graph_shape(tiny_adapter):
    """The pseudo-queries' captured rows are their whole padded blocks, so two histories
    whose prompts pad to the same length run the same graph (no new capture per question);
    only the mean over each prompt's own tokens differs."""
    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 64)["hermes"], chunk_frames=4, options=RuntimeOptions(answer_path="static"))
    graphs = session.chunk_graphs = ChunkGraphs(tiny_adapter, session.store, use_graphs=False, after=0)
    session.add_frames(text_frames(tiny_adapter, 24, seed=8))
    lead = tiny_adapter.frames_piece(text_frames(tiny_adapter, 4, seed=9), session.frames_seen)
    lengths = session.store.lengths()
    replays, before = graphs.replays, set(graphs._graphs)  # the stream's own shapes (no history)
    attention, prompt_lengths = [], []
    for history in ([("Where?", "Here.")], [("Where?", "Here!!")]):  # one byte more
        request = session.retention.guidance(session.store, history)
        prompts = [tiny_adapter.question_piece(p) for p in request.prompts]
        prompt_lengths.append([len(p) for p in prompts])
        attention.append(session.guidance_attention(request, lead=lead, prompt_pieces=prompts))
        session.store.truncate(lengths)
    first, second = prompt_lengths
    assert first != second and [-(-n // 16) for n in first] == [-(-n // 16) for n in second]
    assert len(set(graphs._graphs) - before) == 1 and graphs.replays == replays + 2  # one shape, run twice
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(*attention, strict=True))


@pytest.mark.parametrize("failures", [1, 10])
def test_a_failed_capture_is_tried_again_when_its_shape_recurs(tiny_adapter, failures, monkeypatch):
    """A capture that fails (after its warm-up wrote the chunk) leaves that chunk to the
    eager path, with the same results; the shape is captured again when it recurs, and
    after MAX_CAPTURE_ATTEMPTS failures it runs eagerly for good."""
    from hermes_policy.graphs import chunk_graphs

    plain, plain_answers = run_stream(tiny_adapter, "hermes", fixed_buffers=False)
    tries: list[tuple] = []

    def capture(graphs, body):  # as ChunkGraphs._capture, without CUDA: a warm-up, then the recording
        warm = body()
        tries.append(graphs.store.lengths())
        if len(tries) <= failures:
            raise RuntimeError("operation failed due to a previous error during capture")
        return None, warm, warm

    def building(adapter, store, **kwargs):
        graphs = chunk_graphs.ChunkGraphs(adapter, store, **kwargs)
        graphs.use_graphs = True  # through the capture branch (the graph itself is not needed)
        graphs.embeddings_in_graph = False  # embedded before the graph, as Qwen2.5-VL's chunks are
        monkeypatch.setattr(graphs, "_capture", lambda body: capture(graphs, body))
        return graphs

    monkeypatch.setattr(chunk_graphs, "MAX_CAPTURE_ATTEMPTS", 2)
    monkeypatch.setitem(globals(), "ChunkGraphs", building)  # what run_stream builds
    with pytest.warns(UserWarning, match="capture of an ingest forward failed") as warned:
        fixed, fixed_answers = run_stream(tiny_adapter, "hermes", fixed_buffers=True)
    graphs = fixed.chunk_graphs
    assert fixed_answers == plain_answers
    assert fixed.store.lengths() == plain.store.lengths()
    for layer in range(tiny_adapter.num_layers):
        torch.testing.assert_close(fixed.store.layer(layer).keys, plain.store.layer(layer).keys, atol=1e-5, rtol=1e-5)
    messages = [str(w.message) for w in warned if "capture of an ingest forward failed" in str(w.message)]
    if failures == 1:
        assert len(messages) == 1 and "captured again when it recurs" in messages[0]
        assert not graphs.failed and graphs.captures >= 1 and graphs.replays > graphs.captures
    else:
        # every shape gives up after two failed captures
        assert all(graphs._attempts[key] == 2 for key in graphs.failed) and graphs.failed
        assert sum(graphs._attempts.values()) == len(tries) == len(messages)
        assert any("this shape runs eagerly" in m for m in messages) and graphs.captures == 0
