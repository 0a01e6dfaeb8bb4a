"""StreamingSession on a tiny Llama: exactness against one-shot forwards, fifo bounds, Q/A hygiene."""

from __future__ import annotations

import pytest
import torch
from reference import one_shot_logits

from hermes_policy import StreamingSession
from hermes_policy.cache.positions import compact_positions
from hermes_policy.errors import StreamError
from hermes_policy.options import RuntimeOptions
from hermes_policy.retention import FifoRetention, FullRetention


def random_frames(adapter, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n, adapter.tokens_per_frame), generator=generator)


@pytest.mark.parametrize("chunk_frames,n_frames", [(1, 3), (3, 7), (4, 8)])
def test_full_streaming_equals_one_shot_forward(tiny_adapter, chunk_frames, n_frames):
    frames = random_frames(tiny_adapter, n_frames)
    session = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=chunk_frames)
    session.add_frames(frames)
    question = "What is on the table?"
    streamed = session.next_token_logits(question)

    pieces = [tiny_adapter.prefix_piece(session.system_prompt)]
    for start in range(0, n_frames, chunk_frames):
        pieces.append(tiny_adapter.frames_piece(frames[start : start + chunk_frames], start))
    pieces.append(tiny_adapter.question_piece(question))
    reference = one_shot_logits(tiny_adapter, pieces)[0, -1]
    torch.testing.assert_close(streamed, reference, atol=1e-4, rtol=1e-4)


def test_greedy_answer_equals_one_shot_greedy_decoding(tiny_adapter):
    frames = random_frames(tiny_adapter, 6, seed=1)
    session = StreamingSession(tiny_adapter, chunk_frames=3)
    session.add_frames(frames)
    answer = session.ask("Describe it.", max_new_tokens=6)

    pieces = [tiny_adapter.prefix_piece(session.system_prompt)]
    pieces += [tiny_adapter.frames_piece(frames[i : i + 3], i) for i in (0, 3)]
    question = tiny_adapter.question_piece("Describe it.")
    ids = torch.cat([p.input_ids for p in pieces] + [question.input_ids])
    generated = []
    with torch.inference_mode():
        for _ in range(6):
            logits = tiny_adapter.model(input_ids=ids[None]).logits[0, -1]
            token = int(logits.argmax())
            generated.append(token)
            if token in tiny_adapter.stop_token_ids:
                break
            ids = torch.cat([ids, torch.tensor([token])])
    assert answer.token_ids == [t for t in generated if t not in tiny_adapter.stop_token_ids]


def test_ask_leaves_no_trace_in_the_cache(tiny_adapter):
    session = StreamingSession(tiny_adapter, chunk_frames=2)
    session.add_frames(random_frames(tiny_adapter, 4))
    lengths = session.store.lengths()
    keys = session.store.cache.layers[1].keys.clone()
    answer = session.ask("What happened?", max_new_tokens=5)
    assert session.store.lengths() == lengths
    assert torch.equal(session.store.cache.layers[1].keys, keys)
    assert session.history[-1].question == "What happened?"
    assert session.history[-1].answer == answer.text
    assert answer.ttft_ms > 0 and answer.tokens_kept == session.tokens_kept
    assert answer.kv_cache_bytes == session.store.nbytes() > 0


def test_pending_frames_are_ingested_before_a_question(tiny_adapter):
    session = StreamingSession(tiny_adapter, chunk_frames=4)
    report = session.add_frames(random_frames(tiny_adapter, 6))
    assert report.chunks == 1 and session.frames_seen == 4
    answer = session.ask("Anything?", max_new_tokens=2)
    assert answer.pending_frames == 2 and session.frames_seen == 6
    assert session.tokens_kept == [6 * tiny_adapter.tokens_per_frame] * tiny_adapter.num_layers


def test_fifo_with_a_large_budget_answers_exactly_like_full(tiny_adapter):
    frames = random_frames(tiny_adapter, 9, seed=2)
    full = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=3)
    fifo = StreamingSession(tiny_adapter, FifoRetention(budget=10_000), chunk_frames=3)
    full.add_frames(frames)
    fifo.add_frames(frames)
    assert fifo.ask("Say something.").token_ids == full.ask("Say something.").token_ids
    assert torch.equal(fifo.next_token_logits("Why?"), full.next_token_logits("Why?"))


def test_fifo_keeps_the_budget_and_the_position_limit_over_a_long_stream(tiny_llama_small_limit_dir):
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llama_small_limit_dir, device="cpu", tokens_per_frame=4)
    budget = 64
    session = StreamingSession(adapter, FifoRetention(budget=budget), chunk_frames=8)
    frames = random_frames(adapter, 520, seed=5)
    for start in range(0, 520, 40):
        session.add_frames(frames[start : start + 40])
        assert max(session.tokens_kept) <= budget
        for layer in range(adapter.num_layers):
            positions = session.store.positions[layer]
            assert int(positions.max()) < adapter.max_positions
            # re-indexed contiguous after every eviction, as in the paper's analysis
            assert torch.equal(positions, compact_positions(positions, session.store.prefix_len))
    assert session.frames_seen == 520 and session.frames_seen * 4 > adapter.max_positions
    # the kept tokens are the newest ones
    kept_frames = session.store.frame_index[0][session.store.prefix_len :]
    assert kept_frames.tolist() == sorted(kept_frames.tolist()) and int(kept_frames[-1]) == 519
    answer = session.ask("What now?", max_new_tokens=4)
    assert answer.tokens_kept == [budget] * adapter.num_layers


def test_full_warns_when_the_stream_passes_the_position_limit(tiny_llama_small_limit_dir):
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llama_small_limit_dir, device="cpu", tokens_per_frame=16)
    session = StreamingSession(adapter, FullRetention(), chunk_frames=16)
    with pytest.warns(UserWarning, match="beyond the model's limit"):
        session.add_frames(random_frames(adapter, 80))


def test_text_frames_are_exactly_n_tokens(tiny_adapter):
    n = tiny_adapter.tokens_per_frame
    assert len(tiny_adapter.frame_ids("a")) == n
    assert len(tiny_adapter.frame_ids("a much longer frame description than eight bytes")) == n
    piece = tiny_adapter.frames_piece(["one", "two two two two two"], first_frame=5)
    assert len(piece) == 2 * n
    assert piece.frame_index.tolist() == [5] * n + [6] * n


def test_garbage_collection_pauses_only_until_the_first_token(tiny_adapter):
    import gc

    from hermes_policy.session.questions import paused_collection

    assert gc.isenabled()
    with paused_collection() as resume:
        assert not gc.isenabled()
        resume()
        assert gc.isenabled()
    with pytest.raises(ValueError), paused_collection():
        raise ValueError
    assert gc.isenabled()
    session = StreamingSession(tiny_adapter, chunk_frames=4, options=RuntimeOptions(answer_path="static"))
    with pytest.raises(StreamError):
        session.ask("Too early?")
    assert gc.isenabled()
    session.add_frames(torch.randint(0, 250, (4, tiny_adapter.tokens_per_frame)))
    session.ask("Where?", max_new_tokens=3)
    assert gc.isenabled()


def test_many_chunks_in_one_call_equal_one_call_per_chunk(tiny_adapter):
    """Within one add_frames call the next chunk is encoded before the current chunk's
    compression step (its host work then overlaps the GPU's): same cache, same answers as
    chunk-by-chunk calls, and a failure in the compression step loses no frame."""
    from test_answer_paths import rules, text_frames

    frames = text_frames(tiny_adapter, 24, seed=4)
    sessions = []
    for batched in (False, True):
        session = StreamingSession(tiny_adapter, rules(tiny_adapter, 48)["hermes"], chunk_frames=4)
        if batched:
            session.add_frames(frames)
        else:
            for start in range(0, 24, 4):
                session.add_frames(frames[start : start + 4])
        sessions.append((session, session.ask("Where is the ball?", max_new_tokens=5).token_ids))
    (single, single_answer), (batched, batched_answer) = sessions
    assert batched.compressions == single.compressions > 0 and batched_answer == single_answer
    for layer in range(tiny_adapter.num_layers):
        a, b = single.store.layer(layer), batched.store.layer(layer)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.frame_index, b.frame_index)
        torch.testing.assert_close(b.keys, a.keys, atol=1e-6, rtol=1e-5)

    # the order of the work: chunk k + 1 encoded between chunk k's forward and its compression
    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 48)["fifo"], chunk_frames=4)
    events = []
    encode, retain = session.adapter.frames_piece, session._apply_retention

    def traced_encode(chunk, first, *args, **kwargs):
        events.append(("encode", first))
        return encode(chunk, first, *args, **kwargs)

    def traced_retain(*args, **kwargs):
        events.append(("compress", session.frames_seen))
        return retain(*args, **kwargs)

    session.adapter.frames_piece, session._apply_retention = traced_encode, traced_retain
    try:
        session.add_frames(frames[:12])
    finally:
        del session.adapter.frames_piece
    assert events == [("encode", 0), ("encode", 4), ("compress", 4), ("encode", 8), ("compress", 8), ("compress", 12)]

    def failing(*args, **kwargs):
        raise RuntimeError("compression failed")

    session._apply_retention = failing
    with pytest.raises(RuntimeError, match="compression failed"):
        session.add_frames(frames[12:20])
    assert session.frames_seen == 16 and len(session._pending) == 4  # the next chunk still queued


def test_prompt_row_weights_are_one_buffer_per_prompt_refilled_when_its_length_changes(tiny_adapter):
    """A CUDA graph reads the weights' buffer at replay: the same tensor for a prompt and
    padded length, holding 1/n for the prompt's n tokens and 0 for its padding."""
    planner = StreamingSession(tiny_adapter, chunk_frames=2).planner
    first = planner._row_weights_of(0, 5, 16)
    assert torch.equal(first, torch.tensor([0.2] * 5 + [0.0] * 11))
    assert planner._row_weights_of(0, 5, 16) is first
    again = planner._row_weights_of(0, 12, 16)
    assert again is first and torch.equal(first, torch.tensor([1 / 12] * 12 + [0.0] * 4))
    assert planner._row_weights_of(1, 12, 16) is not first
