"""The question-time baselines: ``window`` (SimpleStream) and ``retrieval`` (ReKV), on a tiny Llama.

References: the full cache, one-shot forwards of the frames a window should hold, a cache
assembled by hand from each chunk's keys as its sliding-window prefill left them, and a
brute-force chunk score.
"""

from __future__ import annotations

import pytest
import torch
from reference import one_shot_logits

from hermes_policy import StreamingSession
from hermes_policy.errors import RetentionError
from hermes_policy.retention import (
    FifoRetention,
    FullRetention,
    RetrievalRetention,
    WindowRetention,
    make_rule,
)
from hermes_policy.retention.retrieval_retention import chunk_scores
from hermes_policy.retention.window_retention import window_chunks

QUESTION = "What came last?"


def frames(adapter, n, seed=0):
    return torch.randint(0, 250, (n, adapter.tokens_per_frame), generator=torch.Generator().manual_seed(seed))


# -- window ---------------------------------------------------------------------------------
def test_window_chunks_split_at_the_streams_chunk_boundaries():
    assert window_chunks([17, 18, 19, 20, 21], 4) == [(0, 3), (3, 5)]
    assert window_chunks([8, 9, 10, 11], 4) == [(0, 4)]
    assert window_chunks([5], 8) == [(0, 1)]


@pytest.mark.parametrize("chunk_frames,n_frames", [(3, 7), (4, 8)])
def test_window_covering_the_stream_equals_full(tiny_adapter, chunk_frames, n_frames):
    stream = frames(tiny_adapter, n_frames, seed=3)
    full = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=chunk_frames)
    window = StreamingSession(tiny_adapter, WindowRetention(frames=n_frames + 5), chunk_frames=chunk_frames)
    full.add_frames(stream)
    window.add_frames(stream)
    assert window.tokens_kept == [0] * tiny_adapter.num_layers  # nothing prefilled before a question
    assert torch.equal(window.next_token_logits(QUESTION), full.next_token_logits(QUESTION))
    assert window.ask("Tell me.", max_new_tokens=5).token_ids == full.ask("Tell me.", max_new_tokens=5).token_ids


@pytest.mark.parametrize("size,chunk_frames,n_frames", [(4, 8, 20), (5, 4, 22)])
def test_window_sees_exactly_its_last_frames_prefilled_fresh(tiny_adapter, size, chunk_frames, n_frames):
    stream = frames(tiny_adapter, n_frames, seed=4)
    session = StreamingSession(tiny_adapter, WindowRetention(frames=size), chunk_frames=chunk_frames)
    for start in range(0, n_frames, 3):  # frames arrive in uneven bursts
        session.add_frames(stream[start : start + 3])
    logits = session.next_token_logits(QUESTION)

    first = n_frames - size
    pieces = [tiny_adapter.prefix_piece(session.system_prompt)]
    boundaries = sorted({first, *range(-(-first // chunk_frames) * chunk_frames, n_frames, chunk_frames)})
    for start, stop in zip(boundaries, [*boundaries[1:], n_frames]):
        pieces.append(tiny_adapter.frames_piece(stream[start:stop], start))
    pieces.append(tiny_adapter.question_piece(QUESTION))
    torch.testing.assert_close(logits, one_shot_logits(tiny_adapter, pieces)[0, -1], atol=1e-4, rtol=1e-4)
    assert session.tokens_kept == [size * tiny_adapter.tokens_per_frame] * tiny_adapter.num_layers


def test_window_prefills_once_per_new_frames_and_stays_bounded(tiny_adapter, monkeypatch):
    session = StreamingSession(tiny_adapter, WindowRetention(frames=3), chunk_frames=4)
    calls = []
    real = session.prefill_frames
    monkeypatch.setattr(session, "prefill_frames", lambda *a: calls.append(a) or real(*a))
    session.add_frames(frames(tiny_adapter, 40, seed=5))
    first = session.ask("One?", max_new_tokens=3)
    again = session.ask("One?", max_new_tokens=3)
    assert first.token_ids == again.token_ids
    built = len(calls)
    assert built >= 1
    session.add_frames(frames(tiny_adapter, 40, seed=6))
    later = session.ask("Two?", max_new_tokens=3)
    assert len(calls) > built  # new frames: the window is rebuilt
    assert later.tokens_kept == first.tokens_kept == [3 * tiny_adapter.tokens_per_frame] * tiny_adapter.num_layers
    assert later.kv_cache_bytes == first.kv_cache_bytes
    assert session.memory.nbytes() == 3 * frames(tiny_adapter, 1).nbytes


def test_window_needs_a_frame(tiny_adapter):
    with pytest.raises(RetentionError, match="at least 1 frame"):
        StreamingSession(tiny_adapter, WindowRetention(frames=0))


# -- retrieval ------------------------------------------------------------------------------
def test_chunk_scores_equal_brute_force_under_grouped_query_attention():
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, chunks = 6, 2, 5, 7
    queries = torch.randn(heads, dim, generator=generator)
    key_means = torch.randn(chunks, kv_heads, dim, generator=generator)
    expected = torch.tensor(
        [
            sum(float(queries[h] @ key_means[c, h // (heads // kv_heads)]) for h in range(heads)) / heads
            for c in range(chunks)
        ]
    )
    torch.testing.assert_close(chunk_scores(queries, key_means), expected)
    with pytest.raises(ValueError, match="do not group"):
        chunk_scores(torch.randn(5, dim), key_means)


def test_retrieval_with_a_window_holding_the_stream_equals_full(tiny_adapter):
    stream = frames(tiny_adapter, 9, seed=7)
    full = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=3)
    retrieval = StreamingSession(tiny_adapter, RetrievalRetention(budget=10_000, retrieve_chunks=2), chunk_frames=3)
    full.add_frames(stream)
    retrieval.add_frames(stream)
    assert torch.equal(retrieval.next_token_logits(QUESTION), full.next_token_logits(QUESTION))
    assert retrieval.memory.retrieved == [[]] * tiny_adapter.num_layers  # nothing was evicted
    assert retrieval.ask("Tell me.", max_new_tokens=5).token_ids == full.ask("Tell me.", max_new_tokens=5).token_ids


def sliding_window_cache(adapter, stream, budget, chunk_frames):
    """A fifo session of the same window, with every chunk's freshly prefilled keys and
    values recorded by the test (not by the retrieval memory) right after its prefill."""
    # positions as encoded (no re-indexing), as the retrieval rule keeps them
    session = StreamingSession(adapter, FifoRetention(budget=budget, reindex="never"), chunk_frames=chunk_frames)
    recorded = []
    real = session._prefill_encoded

    def recording(piece, n):
        out = real(piece, n)
        m = len(piece)
        recorded.append(
            {
                layer: (
                    session.store.cache.layers[layer].keys[..., -m:, :].clone(),
                    session.store.cache.layers[layer].values[..., -m:, :].clone(),
                    session.store.positions[layer][:, -m:].clone(),
                    session.store.frame_index[layer][-m:].clone(),
                )
                for layer in range(adapter.num_layers)
            }
        )
        return out

    session._prefill_encoded = recording
    session.add_frames(stream)
    return session, recorded


def test_retrieving_every_chunk_equals_attending_over_every_chunk_as_encoded(tiny_adapter):
    """Budget 20 tokens (2.5 frames of 8), chunks of 2 frames: each chunk is encoded under a
    sliding window. With every chunk retrieved, the question sees all of them: the same as a
    cache that holds the prefix and every chunk's recorded tokens in temporal order."""
    stream = frames(tiny_adapter, 10, seed=8)
    retrieval = StreamingSession(tiny_adapter, RetrievalRetention(budget=20, retrieve_chunks=99), chunk_frames=2)
    retrieval.add_frames(stream)
    assert max(retrieval.tokens_kept) == 20
    logits = retrieval.next_token_logits(QUESTION)
    assert retrieval.tokens_kept == [20] * tiny_adapter.num_layers  # retrieved tokens dropped again
    # chunk 4 (the newest 16 tokens) is still on the GPU, chunk 3 half: both windows meet exactly
    assert all(picked == [0, 1, 2, 3] for picked in retrieval.memory.retrieved)

    reference, recorded = sliding_window_cache(tiny_adapter, stream, 20, 2)
    store = reference.store
    store.truncate([store.prefix_len] * store.num_layers)
    for chunk in recorded:
        store.append_layers(chunk)
    assert store.stream_lengths() == [80] * tiny_adapter.num_layers
    torch.testing.assert_close(logits, reference.next_token_logits(QUESTION), atol=1e-5, rtol=1e-5)


def test_retrieval_brings_back_at_most_k_chunks_and_only_evicted_tokens(tiny_adapter):
    stream = frames(tiny_adapter, 12, seed=9)
    session = StreamingSession(tiny_adapter, RetrievalRetention(budget=20, retrieve_chunks=2), chunk_frames=2)
    session.add_frames(stream)
    seen = []
    real = session.store.append_layers

    def spy(contents):
        seen.append({layer: value[2][0].tolist() for layer, value in contents.items()})
        real(contents)

    session.store.append_layers = spy
    window_positions = [set(session.store.positions[layer][0, session.store.prefix_len :].tolist()) for layer in range(tiny_adapter.num_layers)]
    answer = session.ask("Which?", max_new_tokens=2)
    assert answer.tokens_kept[0] <= 20 + 2 * 16
    for layer, positions in seen[0].items():
        assert len(session.memory.retrieved[layer]) == 2
        assert not set(positions) & window_positions[layer]  # no token twice
        assert positions == sorted(positions)  # chunks in temporal order
    assert answer.host_memory_bytes == session.memory.nbytes() > 0


def test_retrieval_refuses_to_pass_its_host_budget(tiny_adapter):
    session = StreamingSession(tiny_adapter, RetrievalRetention(budget=16, host_budget_bytes=20_000), chunk_frames=2)
    with pytest.raises(RetentionError, match="host budget"):
        session.add_frames(frames(tiny_adapter, 40, seed=10))


def test_make_rule_takes_the_question_time_options(tiny_adapter):
    assert make_rule("window", frames=6).frames == 6
    rule = make_rule("retrieval", 512, retrieve_chunks=3)
    assert (rule.budget, rule.retrieve_chunks) == (512, 3)
    assert make_rule("window", frames=None).frames == 4
    with pytest.raises(RetentionError, match="no option frames"):
        make_rule("fifo", 64, frames=3)


def test_batched_continuation_scores_go_through_the_question_time_memory(tiny_adapter):
    """The fidelity testbed's batched scoring: a window covering the stream scores as full
    does; retrieval scores each question with its own retrieval (batched == one by one)."""
    stream = frames(tiny_adapter, 12, seed=11)
    items = [([5, 6, 7], [8, 9]), ([11, 12], [13, 14, 15])]
    full = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=4)
    window = StreamingSession(tiny_adapter, WindowRetention(frames=12), chunk_frames=4)
    retrieval = StreamingSession(tiny_adapter, RetrievalRetention(budget=24, retrieve_chunks=1), chunk_frames=4)
    for session in (full, window, retrieval):
        session.add_frames(stream)
    for ours, theirs in zip(window.batch_continuation_logprobs(items), full.batch_continuation_logprobs(items)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    batched = retrieval.batch_continuation_logprobs(items)
    alone = [retrieval.batch_continuation_logprobs([item])[0] for item in items]
    for ours, theirs in zip(batched, alone):
        torch.testing.assert_close(ours, theirs)
    assert retrieval.tokens_kept == [24] * tiny_adapter.num_layers
