"""LLaVA-OneVision adapter on a tiny random model: layout, exactness, retention, input errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import concat_pieces, one_shot_logits
from tiny_llava_ov import tiny_llava_onevision

from hermes_policy.errors import StreamError, VideoInputError
from hermes_policy.models import load_adapter
from hermes_policy.options import RuntimeOptions
from hermes_policy.retention import FifoRetention
from hermes_policy.session import StreamingSession

QUESTION = "What is happening in the video?"
SYSTEM = "You watch a stream."
CHUNK = 4


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llava_onevision(tmp_path_factory.mktemp("tiny_llava_ov"))


@pytest.fixture(scope="module")
def adapter(llava_dir: Path):
    return load_adapter(llava_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def native_model(llava_dir: Path):
    """The same checkpoint with transformers' own (eager) attention: an independent forward."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        llava_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def random_frames(n: int, size: tuple[int, int] = (24, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def stream_pieces(
    adapter, frames: np.ndarray, chunk: int, question: str = QUESTION, system: str = SYSTEM
):
    pieces = [adapter.prefix_piece(system)]
    pieces += [
        adapter.frames_piece(frames[i : i + chunk], i, None) for i in range(0, len(frames), chunk)
    ]
    return pieces + [adapter.question_piece(question)]


def native_prompt(
    adapter, videos: list[np.ndarray], question: str = QUESTION, system: str = SYSTEM
):
    """Token ids and pixels built by the model's own processor, one ``<video>`` per chunk."""
    processor = adapter.processor
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {
            "role": "user",
            "content": [{"type": "video"} for _ in videos] + [{"type": "text", "text": question}],
        },
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=text, videos=videos, return_tensors="pt")


def test_loads_and_counts_tokens_per_frame(adapter):
    from hermes_policy.models.llava_onevision import LlavaOnevisionAdapter

    assert isinstance(adapter, LlavaOnevisionAdapter)
    assert adapter.position_axes == 1 and adapter.dtype == torch.float32
    vision = adapter.model.config.vision_config
    side = math.ceil((vision.image_size // vision.patch_size) / 2)
    assert adapter.tokens_per_frame == side * side == 9

    frames = random_frames(3)
    piece = adapter.frames_piece(frames, 5, None)
    assert len(piece) == 3 * adapter.tokens_per_frame + 1  # + the chunk's newline
    assert bool((piece.input_ids == adapter.model.config.video_token_id).all())
    assert torch.equal(piece.positions, torch.arange(len(piece))[None])
    expected_frames = [5] * 9 + [6] * 9 + [7] * 9 + [-1]
    assert piece.frame_index.tolist() == expected_frames
    pixels = piece.model_inputs["pixel_values_videos"]
    assert pixels.shape == (1, 3, 3, vision.image_size, vision.image_size)
    with torch.inference_mode():
        raw = adapter.base_model.get_video_features(pixels).pooler_output
        features = adapter.video_features(pixels)
    # The model's own count: 9 pooled features per frame (transformers 5.23 appends the
    # chunk's newline inside get_video_features, 5.17 later in forward).
    raw = raw.reshape(-1, raw.shape[-1])
    assert raw.shape[0] in (3 * adapter.tokens_per_frame, 3 * adapter.tokens_per_frame + 1)
    assert torch.allclose(
        features[: 3 * adapter.tokens_per_frame], raw[: 3 * adapter.tokens_per_frame]
    )
    assert features.shape[0] == len(piece)
    # The newline is the model's learned image_newline, appended once per chunk.
    assert torch.allclose(features[-1], adapter.model.model.image_newline)


def test_chunk_layout_matches_the_processor(adapter):
    """Prefix + chunk + question reproduce the processor's own tokens and pixels."""
    frames = random_frames(CHUNK, seed=1)
    pieces = stream_pieces(adapter, frames, CHUNK)
    merged, _ = concat_pieces(adapter, pieces)
    native = native_prompt(adapter, [frames])
    assert merged.input_ids.tolist() == native["input_ids"][0].tolist()
    assert torch.equal(merged.model_inputs["pixel_values_videos"], native["pixel_values_videos"])


def test_streaming_equals_one_shot_and_native_forward(adapter, native_model):
    frames = random_frames(8, seed=2)
    session = StreamingSession(adapter, chunk_frames=CHUNK, system_prompt=SYSTEM)
    report = session.add_frames(frames)
    assert report.chunks == 2
    assert session.tokens_kept == [2 * adapter.chunk_tokens(CHUNK)] * adapter.num_layers

    streamed = session.next_token_logits(QUESTION)
    pieces = stream_pieces(adapter, frames, CHUNK, system=session.system_prompt)
    reference = one_shot_logits(adapter, pieces)
    assert torch.allclose(streamed, reference[0, -1], atol=1e-4), (
        (streamed - reference[0, -1]).abs().max()
    )

    # Independent check: the processor's own prompt (one <video> per chunk) through the
    # model's native forward (eager attention, default positions) gives the same logits.
    native_inputs = native_prompt(adapter, [frames[:CHUNK], frames[CHUNK:]])
    merged, _ = concat_pieces(adapter, pieces)
    assert merged.input_ids.tolist() == native_inputs["input_ids"][0].tolist()
    with torch.inference_mode():
        native = native_model(
            input_ids=native_inputs["input_ids"],
            pixel_values_videos=native_inputs["pixel_values_videos"],
        ).logits
    assert native.shape == reference.shape
    assert torch.allclose(native, reference, atol=1e-4), (native - reference).abs().max()
    # The comparison is discriminating: other frames give clearly different logits.
    other = one_shot_logits(adapter, stream_pieces(adapter, frames[::-1].copy(), CHUNK))
    assert (other[0, -1] - reference[0, -1]).abs().max() > 1e-2


def test_short_last_chunk_matches_reference(adapter):
    """A flushed shorter chunk: the reference encodes videos of different lengths one by one."""
    frames = random_frames(10, seed=3)
    session = StreamingSession(adapter, chunk_frames=CHUNK, system_prompt=SYSTEM)
    session.add_frames(frames)
    streamed = session.next_token_logits(QUESTION)  # flushes the 2 waiting frames
    assert session.frames_seen == 10
    pieces = stream_pieces(adapter, frames, CHUNK)
    merged, _ = concat_pieces(adapter, pieces)
    assert isinstance(merged.model_inputs["pixel_values_videos"], list)
    reference = one_shot_logits(adapter, pieces)[0, -1]
    assert torch.allclose(streamed, reference, atol=1e-4), (streamed - reference).abs().max()

    # The per-video path equals the batched native path on equal chunks.
    equal = stream_pieces(adapter, frames[:8], CHUNK)
    batched, positions = concat_pieces(adapter, equal)
    per_video = dict(batched.model_inputs)
    per_video["pixel_values_videos"] = list(per_video["pixel_values_videos"].split(1))
    with torch.inference_mode():
        a = adapter.forward(batched, positions)
        batched.model_inputs = per_video
        b = adapter.forward(batched, positions)
    assert torch.allclose(a, b, atol=1e-5)


def test_fifo_bounded_contiguous_and_within_limit(adapter):
    budget = 40
    session = StreamingSession(
        adapter,
        FifoRetention(budget=budget),
        chunk_frames=CHUNK,
        system_prompt=SYSTEM,
        max_new_tokens=4,
    )
    frames = random_frames(220, size=(8, 8), seed=4)
    store = session.store
    for start in range(0, len(frames), CHUNK):
        session.add_frames(frames[start : start + CHUNK])
        for layer in range(adapter.num_layers):
            assert store.length(layer) - store.prefix_len <= budget
            positions = store.positions[layer][0]
            offset = int(positions[: store.prefix_len].max()) + 1
            stream = positions[store.prefix_len :]
            assert torch.equal(stream, torch.arange(offset, offset + stream.numel()))
            assert int(positions.max()) < adapter.max_positions
    # The stream was long enough to pass the position limit without re-indexing.
    assert session.frames_seen * adapter.tokens_per_frame > adapter.max_positions
    assert session.tokens_kept == [budget] * adapter.num_layers
    # FIFO keeps the newest tokens: the last frame and the last chunk's newline.
    kept_frames = store.frame_index[0][store.prefix_len :]
    assert int(kept_frames.max()) == 219 and int(kept_frames[-1]) == -1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answer = session.ask(QUESTION)
    assert len(answer.token_ids) <= 4 and answer.frames_seen == 220
    assert session.tokens_kept == [budget] * adapter.num_layers


def test_budget_above_stream_answers_like_full(adapter):
    frames = random_frames(12, size=(16, 16), seed=5)
    full = StreamingSession(adapter, chunk_frames=CHUNK, system_prompt=SYSTEM, max_new_tokens=6)
    fifo = StreamingSession(
        adapter,
        FifoRetention(budget=1000),
        chunk_frames=CHUNK,
        system_prompt=SYSTEM,
        max_new_tokens=6,
    )
    full.add_frames(frames)
    fifo.add_frames(frames)
    assert fifo.compressions == 0
    assert torch.equal(full.next_token_logits(QUESTION), fifo.next_token_logits(QUESTION))
    a, b = full.ask(QUESTION), fifo.ask(QUESTION)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert torch.equal(full.next_token_logits("Again?"), fifo.next_token_logits("Again?"))


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((4, 16, 16), dtype=np.uint8),  # no channel axis
        np.zeros((4, 16, 16, 4), dtype=np.uint8),  # RGBA
        np.zeros((16, 16, 3), dtype=np.uint8),  # a single frame without the frame axis
        np.zeros((4, 16, 16, 3), dtype=np.float32),  # not uint8
        ["a frame described in text"],
    ],
    ids=["gray", "rgba", "no-frame-axis", "float", "text"],
)
def test_bad_frames_raise_clear_errors(adapter, frames):
    with pytest.raises((StreamError, VideoInputError), match="frames"):
        adapter.frames_piece(frames, 0, None)


def test_session_rejects_bad_frames_and_stays_usable(adapter):
    session = StreamingSession(adapter, chunk_frames=2, system_prompt=SYSTEM, max_new_tokens=2)
    with pytest.raises(StreamError, match="uint8"):
        session.add_frames(np.zeros((2, 16, 16, 3), dtype=np.float32))
    with pytest.raises(StreamError, match="shape"):
        session.add_frames(np.zeros((2, 16, 16), dtype=np.uint8))
    assert session.frames_seen == 0 and session.tokens_kept == [0] * adapter.num_layers
    session.add_frames(random_frames(2, size=(16, 16)))
    assert session.ask(QUESTION).frames_seen == 2


def test_input_embeddings_feed_the_text_model_like_the_forward(adapter):
    """The split the ingest graphs use: embeddings (vision features in place) then the
    decoder stack alone, against the model's own forward of the same chunk."""
    piece = adapter.frames_piece(random_frames(3, seed=4), 0, None)
    positions = torch.arange(len(piece))[None]
    with torch.inference_mode():
        whole = adapter.forward(piece, positions)
        embeds = adapter.input_embeddings(piece)
        split = adapter.text_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    assert embeds.shape == (1, len(piece), adapter.text_config.hidden_size)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


# the vision tower inside the fixed-buffer body (pixels, ids and <video> slots as its
# inputs), or the embeddings computed before it
@pytest.mark.parametrize("embeddings_in_graph", [True, False])
@pytest.mark.parametrize("rule", ["fifo", "hermes"])  # hermes: pseudo-query blocks behind the chunk
def test_fixed_buffer_ingest_of_video_chunks(adapter, embeddings_in_graph, rule):
    from hermes_policy.graphs.chunk_graphs import ChunkGraphs
    from hermes_policy.models.random_shapes import build_random_adapter
    from hermes_policy.policy import ModelInfo, paper_default
    from hermes_policy.retention import FifoRetention, HermesRetention

    if rule == "hermes":  # three tiers need at least three layers: the 4-layer random shape
        adapter = build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32)
    frames = random_frames(12, seed=5)
    budget = 3 * adapter.tokens_per_frame + 2
    results = []
    for fixed in (False, True):
        if rule == "fifo":
            retention = FifoRetention(budget=budget)
        else:
            retention = HermesRetention(policy=paper_default(ModelInfo.of(adapter), budget=budget))
        session = StreamingSession(adapter, retention, chunk_frames=2, options=RuntimeOptions(answer_path="static"))
        if fixed:
            session.chunk_graphs = ChunkGraphs(adapter, session.store, use_graphs=False, after=1)
            session.chunk_graphs.embeddings_in_graph = embeddings_in_graph
        session.add_frames(frames)
        results.append((session, session.ask(QUESTION, max_new_tokens=5).token_ids))
    (plain, plain_answer), (fixed, fixed_answer) = results
    assert fixed.chunk_graphs.replays > 0 and fixed_answer == plain_answer
    if rule == "hermes":
        assert fixed.fused_guidance_passes > 0
    inputs = {name for key in fixed.chunk_graphs._graphs for name, *_ in key[-1] or ()}
    assert inputs == ({"input_ids", "pixels", "slots"} if embeddings_in_graph else set())
    for layer in range(adapter.num_layers):
        torch.testing.assert_close(fixed.store.layer(layer).keys, plain.store.layer(layer).keys, atol=1e-5, rtol=1e-5)
        assert torch.equal(fixed.store.layer(layer).frame_index, plain.store.layer(layer).frame_index)


def test_vision_residual_stream_is_row_major_and_features_unchanged(adapter, native_model):
    """The adapter makes SigLIP's patch embeddings contiguous, so no encoder layer reads a
    transposed residual stream; the features equal the unmodified model's."""
    layouts = []
    layers = [m for m in adapter.base_model.vision_tower.modules() if type(m).__name__.endswith("EncoderLayer")]
    handles = [layer.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous())) for layer in layers]
    pixels = adapter.frames_piece(random_frames(2, seed=5), 0, None).model_inputs["pixel_values_videos"]
    try:
        with torch.inference_mode():
            ours = adapter.video_features(pixels)
    finally:
        for handle in handles:
            handle.remove()
    assert layouts and all(layouts)
    # the native model, unhooked, runs the transposed layout: the check above can fail
    native_layouts = []
    native_layers = [m for m in native_model.model.vision_tower.modules() if type(m).__name__.endswith("EncoderLayer")]
    handles = [
        layer.register_forward_pre_hook(lambda m, args: native_layouts.append(args[0].is_contiguous()))
        for layer in native_layers
    ]
    config = native_model.config
    try:
        with torch.inference_mode():
            native = native_model.model.get_video_features(
                pixels,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
    finally:
        for handle in handles:
            handle.remove()
    assert not all(native_layouts)
    native = getattr(native, "pooler_output", native)
    native = (torch.cat(list(native)) if isinstance(native, (list, tuple)) else native).reshape(-1, ours.shape[-1])
    # ours ends with the image newline (added where this transformers version leaves it out)
    torch.testing.assert_close(ours[: len(native)], native, atol=1e-5, rtol=1e-5)
