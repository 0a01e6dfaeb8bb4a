"""Qwen2.5-VL and Qwen3-VL adapters on tiny random models (fp32, CPU).

Ground truths that do not come from our own code: the model's processor (token layout,
timestamps, ``mm_token_type_ids``), the model's ``get_rope_index`` (positions), the
model's full native forward (vision tower, embedding merge, DeepStack), and the model's
own rotary functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import concat_pieces, one_shot_logits
from tiny_qwen_vl import FRAME_HEIGHT, FRAME_WIDTH, tiny_qwen2_5_vl, tiny_qwen3_vl
from transformers.video_utils import VideoMetadata

from hermes_policy import StreamingSession
from hermes_policy.cache.positions import compact_positions, rerotate_keys, to_model_position_ids
from hermes_policy.models import load_adapter
from hermes_policy.models.qwen_vl import Qwen2_5_VLAdapter, Qwen3VLAdapter, vision_position_ids
from hermes_policy.options import RuntimeOptions
from hermes_policy.retention import FifoRetention

SYSTEM = "You watch a stream."
QUESTION = "What moved?"
MAX_POSITIONS = 512
TOL = 1e-4


@pytest.fixture(scope="module")
def q25(tmp_path_factory: pytest.TempPathFactory) -> Qwen2_5_VLAdapter:
    folder = tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("tiny_qwen2_5_vl"), max_positions=MAX_POSITIONS
    )
    return load_adapter(folder, device="cpu")


@pytest.fixture(scope="module")
def q3(tmp_path_factory: pytest.TempPathFactory) -> Qwen3VLAdapter:
    folder = tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"), max_positions=MAX_POSITIONS)
    return load_adapter(folder, device="cpu")


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def adapter(request: pytest.FixtureRequest):
    return request.getfixturevalue({"qwen2_5_vl": "q25", "qwen3_vl": "q3"}[request.param])


def random_frames(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.uint8)


def stream_pieces(adapter, frames: np.ndarray, chunk: int, fps: float | None, system: str = SYSTEM):
    """The pieces a session builds: prefix, chunks (last one possibly shorter), question."""
    pieces = [adapter.prefix_piece(system)]
    for i in range(0, len(frames), chunk):
        j = min(i + chunk, len(frames))
        times = [k / fps for k in range(i, j)] if fps else None
        pieces.append(adapter.frames_piece(frames[i:j], i, times))
    pieces.append(adapter.question_piece(QUESTION))
    return pieces


def native_inputs(adapter, frames: np.ndarray, chunk: int, fps: float):
    """The model's own processor on the full prompt: one video per chunk, real chat template."""
    videos, metadata = [], []
    for i in range(0, len(frames), chunk):
        j = min(i + chunk, len(frames))
        videos.append(frames[i:j])
        metadata.append(
            VideoMetadata(total_num_frames=j - i, fps=fps, frames_indices=list(range(i, j)))
        )
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {
            "role": "user",
            "content": [{"type": "video"}] * len(videos) + [{"type": "text", "text": QUESTION}],
        },
    ]
    text = adapter.processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return adapter.processor(
        text=[text],
        videos=videos,
        video_metadata=metadata,
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )


def rope_index(adapter, inputs) -> torch.Tensor:
    """The model's own ``get_rope_index`` positions ``(3, seq)`` for a processor output."""
    extra = (
        {"second_per_grid_ts": inputs["second_per_grid_ts"]}
        if "second_per_grid_ts" in inputs
        else {}
    )
    positions, _ = adapter.base_model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        **extra,
    )
    return positions[:, 0]


# -- loading and chunk layout ------------------------------------------------------------
def test_load_adapter_picks_the_qwen_adapters(q25, q3):
    assert isinstance(q25, Qwen2_5_VLAdapter) and isinstance(q3, Qwen3VLAdapter)
    for adapter in (q25, q3):
        assert adapter.position_axes == 3
        assert adapter.dtype == torch.float32
        assert adapter.temporal_patch_size == 2 and adapter.merge_size == 2
    assert len(q3.model.config.vision_config.deepstack_visual_indexes) == 2


def test_tokens_per_frame(adapter):
    # 64 x 96 frames -> grid (4, 6) patches -> 2 x 3 = 6 tokens per temporal patch -> 3 per frame
    fresh = type(adapter)(
        adapter.model, adapter.tokenizer, adapter.processor, frame_size=(FRAME_HEIGHT, FRAME_WIDTH)
    )
    assert fresh.tokens_per_frame == 3
    piece = adapter.frames_piece(random_frames(4), 0)
    assert adapter.tokens_per_frame == 3
    assert int((piece.input_ids == adapter.video_token_id).sum()) == 4 * adapter.tokens_per_frame


def test_chat_parts_match_the_processor_template(adapter):
    prefix, suffix = adapter._chat_template_parts(SYSTEM)
    text_only = adapter.processor.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text_only == prefix + QUESTION + suffix
    assert adapter._question_lead == ""  # Qwen puts the question right after the video


@pytest.mark.parametrize("chunk", [2, 4, 3])
def test_pieces_are_the_processor_tokens(adapter, chunk):
    """Prefix + chunks + question is, token for token, what the real processor produces
    (Qwen3-VL: timestamps and per-temporal-patch vision blocks included)."""
    frames = random_frames(6 if chunk == 3 else 8)
    fps = 2.0
    pieces = stream_pieces(adapter, frames, chunk, fps)
    inputs = native_inputs(adapter, frames, chunk, fps)
    merged, _ = concat_pieces(adapter, pieces)
    assert torch.equal(merged.input_ids, inputs["input_ids"][0])
    assert torch.equal(merged.model_inputs["video_grid_thw"], inputs["video_grid_thw"])
    assert torch.equal(merged.model_inputs["pixel_values_videos"], inputs["pixel_values_videos"])


def test_qwen3_timestamps_and_frame_index(q3):
    # An odd chunk: the processor pads the last temporal patch with a copy of frame 6.
    piece = q3.frames_piece(random_frames(3), 4, [2.0, 2.5, 3.0])
    text = q3.tokenizer.decode(piece.input_ids)
    outer = "<|vision_start|>" if q3.keeps_outer_wrapper else ""
    assert text.startswith(outer + "<2.2 seconds><|vision_start|>")  # (2.0 + 2.5) / 2
    assert "<|vision_end|><3.0 seconds><|vision_start|>" in text
    assert text.endswith("<|vision_end|>" + ("<|vision_end|>" if outer else ""))
    ids, frames = piece.input_ids, piece.frame_index
    video = ids == q3.video_token_id
    assert frames[video].tolist() == [4] * 6 + [6] * 6
    markers = (ids == q3.vision_start_id) | (ids == q3.vision_end_id)
    assert (frames[markers] == -1).all()
    timestamp = ~video & ~markers
    assert sorted(set(frames[timestamp].tolist())) == [4, 6]
    assert frames[timestamp].tolist() == [4] * 13 + [6] * 13


def processor_expansion(adapter, frames: np.ndarray, fps: float, text: str) -> list[int]:
    """The installed processor's token ids for ``text`` holding one video of ``frames``."""
    metadata = VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(range(len(frames))))
    out = adapter.processor(
        text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
        cap_pixels_per_frame=False, return_tensors="pt",
    )
    return out["input_ids"][0].tolist()


def test_qwen3_detects_the_installed_processor_layout(q3):
    """The detected layout is the one the processor gives the chat template's placeholder:
    an outer vision pair around the timestamped groups (transformers 5.10-5.2x), or none
    (4.x, 5.25)."""
    frames = random_frames(4)
    ids = processor_expansion(q3, frames, 2.0, q3.video_placeholder)
    groups = 2  # temporal patches of 4 frames
    assert ids.count(q3.vision_start_id) == groups + int(q3.keeps_outer_wrapper)
    assert (ids[0] == q3.vision_start_id) == q3.keeps_outer_wrapper


@pytest.mark.parametrize("keeps_outer_wrapper", [True, False], ids=["outer-pair-kept", "collapsed"])
def test_qwen3_chunk_text_follows_either_processor_layout(tmp_path, keeps_outer_wrapper):
    """Both sides of the transformers change, on one install. The timestamped groups are
    the processor's own expansion of a bare ``<|video_pad|>`` (every version expands it the
    same way); the kept layout wraps them in the template's pair. A layout the adapter is
    told about (here forced, normally detected) is reproduced token for token, and its
    positions follow the tokens (text +1, each group its own vision block)."""
    adapter = load_adapter(tiny_qwen3_vl(tmp_path, max_positions=MAX_POSITIONS), device="cpu")
    adapter.__dict__["keeps_outer_wrapper"] = keeps_outer_wrapper
    frames = random_frames(4)
    groups = processor_expansion(adapter, frames, 2.0, adapter._token(adapter.video_token_id))
    expected = (
        [adapter.vision_start_id, *groups, adapter.vision_end_id] if keeps_outer_wrapper else groups
    )
    piece = adapter.frames_piece(frames, 0, [0.0, 0.5, 1.0, 1.5])
    assert piece.input_ids.tolist() == expected
    video = (piece.input_ids == adapter.video_token_id).nonzero().flatten()
    first_block = video[:6]
    assert piece.positions[0, first_block].unique().numel() == 1  # one temporal patch: t = s
    assert piece.positions[:, 0].tolist() == [0, 0, 0]
    assert int(piece.positions[:, -1].max()) == int(piece.positions[:, :-1].max()) + 1


def test_qwen3_refuses_an_unknown_processor_layout(tmp_path, monkeypatch):
    from hermes_policy.errors import ModelLoadError

    adapter = load_adapter(tiny_qwen3_vl(tmp_path, max_positions=MAX_POSITIONS), device="cpu")
    real = type(adapter.processor).__call__

    def doubled_markers(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        start = torch.tensor([[adapter.vision_start_id, adapter.vision_start_id]])
        out["input_ids"] = torch.cat([start, out["input_ids"]], dim=1)
        return out

    monkeypatch.setattr(type(adapter.processor), "__call__", doubled_markers)
    with pytest.raises(ModelLoadError, match="verified: transformers"):
        adapter.frames_piece(random_frames(2), 0, None)


def test_qwen2_5_frame_index_odd_chunk(q25):
    piece = q25.frames_piece(random_frames(3), 10, None)
    assert piece.frame_index.tolist() == [-1] + [10] * 6 + [12] * 6 + [-1]
    assert piece.model_inputs["video_grid_thw"].tolist() == [[2, 4, 6]]


def test_qwen2_5_temporal_interval_follows_timestamps(q25):
    # frames 2 s apart (0.5 fps): second_per_grid_ts = 4 s, interval = tokens_per_second (2) x 4
    frames = random_frames(4)
    piece = q25.frames_piece(frames, 0, [0.0, 2.0, 4.0, 6.0])
    video = piece.input_ids == q25.video_token_id
    assert sorted(set(piece.positions[0, video].tolist())) == [1, 9]
    assert piece.positions[:, -1].tolist() == [10, 10, 10]  # vision_end: max + 1
    inputs = native_inputs(q25, frames, 4, 0.5)
    assert inputs["second_per_grid_ts"].tolist() == [4.0]
    theirs = rope_index(q25, inputs)[:, inputs["mm_token_type_ids"][0] == 2]
    assert torch.equal(piece.positions[:, video] - 1, theirs - int(theirs[1].min()))


def test_vision_position_formula_matches_the_model(adapter):
    for grid, interval in (((2, 4, 6), 1.0), ((3, 4, 6), 2.5), ((1, 6, 4), torch.tensor(0.5))):
        ours = vision_position_ids(7, grid, 2, interval)
        try:
            theirs = adapter.base_model.get_vision_position_ids(7, torch.tensor(grid), 1, 2, interval)
        except RuntimeError:
            # transformers 5.17 takes only an int interval (a float one makes a float arange
            # that meshgrid rejects): compare at the nearest integral interval instead.
            step = max(1, round(float(interval)))
            theirs = adapter.base_model.get_vision_position_ids(7, torch.tensor(grid), 1, 2, step)
            ours = vision_position_ids(7, grid, 2, step)
        assert torch.equal(ours, theirs)


# -- positions against the model's get_rope_index ----------------------------------------
@pytest.mark.parametrize("chunk", [2, 4])
def test_vision_positions_equal_get_rope_index(adapter, chunk):
    """Within a chunk, every video token has the position the model's own get_rope_index
    gives it in the same (single-chunk) prompt."""
    frames = random_frames(chunk)
    pieces = stream_pieces(adapter, frames, chunk, 1.0)
    inputs = native_inputs(adapter, frames, chunk, 1.0)
    _, ours = concat_pieces(adapter, pieces)
    theirs = rope_index(adapter, inputs)
    video = inputs["mm_token_type_ids"][0] == 2
    assert int(video.sum()) == chunk * 3
    assert torch.equal(ours[:, video], theirs[:, video])
    before = torch.arange(ours.shape[1]) < int(video.nonzero().min())
    assert torch.equal(ours[:, before], theirs[:, before])


def test_qwen3_positions_equal_get_rope_index_everywhere(q3):
    """Qwen3-VL: t = start in every block, so 'text after a video at max + 1' is exactly
    the model's rule; the whole multi-chunk prompt matches get_rope_index."""
    frames = random_frames(8)
    _, ours = concat_pieces(q3, stream_pieces(q3, frames, 4, 2.0))
    assert torch.equal(ours, rope_index(q3, native_inputs(q3, frames, 4, 2.0)))


def test_qwen2_5_text_after_video_issue_45381(q25):
    """Documents our decision for transformers issue 45381.

    A 4-frame chunk at 1 fps: two temporal patches, temporal interval tokens_per_second (2)
    x second_per_grid_ts (2 s) = 4, so the video's temporal ids are s and s + 4 while its
    merged grid is 2 x 3. transformers 5.23 restarts the text after it at s + max(2, 3) = s + 3,
    below the video's largest temporal id; we continue at (max over all axes) + 1 = s + 5.
    With a single temporal patch (2-frame chunk) both rules agree.
    """
    frames = random_frames(4)
    inputs = native_inputs(q25, frames, 4, 1.0)
    _, ours = concat_pieces(q25, stream_pieces(q25, frames, 4, 1.0))
    theirs = rope_index(q25, inputs)
    video = (inputs["mm_token_type_ids"][0] == 2).nonzero().flatten()
    start, end = int(video.min()), int(video.max()) + 1
    s = int(theirs[1, start])  # first h id of the video = its start position
    assert sorted(set(theirs[0, start:end].tolist())) == [s, s + 4]
    assert theirs[:, end].tolist() == [s + 3] * 3  # transformers: below the temporal id s + 4
    assert ours[:, end].tolist() == [s + 5] * 3  # ours: max over everything before + 1
    assert int(ours[0, end]) == int(ours[:, :end].max()) + 1
    # everything after the video is shifted by the same constant (2): relative order kept
    assert torch.equal(ours[:, end:] - theirs[:, end:], torch.full_like(ours[:, end:], 2))

    frames = random_frames(2)
    _, ours = concat_pieces(q25, stream_pieces(q25, frames, 2, 1.0))
    assert torch.equal(ours, rope_index(q25, native_inputs(q25, frames, 2, 1.0)))


# -- exactness -----------------------------------------------------------------------
@pytest.mark.parametrize("name, chunk", [("q25", 2), ("q3", 4), ("q3", 2)])
def test_reference_equals_native_forward(request, name, chunk):
    """Our one-shot reference (our tokens, positions, model inputs) equals the model's own
    forward on the processor's output, with the model computing positions itself. Chunk
    sizes where get_rope_index and our rule agree (see the issue 45381 test)."""
    adapter = request.getfixturevalue(name)
    frames = random_frames(8, seed=1)
    inputs = native_inputs(adapter, frames, chunk, 1.0)
    with torch.inference_mode():
        native = adapter.model(**inputs).logits[0, -1]
    reference = one_shot_logits(adapter, stream_pieces(adapter, frames, chunk, 1.0))[0, -1]
    assert torch.allclose(reference, native, atol=TOL, rtol=0), (reference - native).abs().max()


def test_qwen2_5_reference_equals_native_with_our_positions(q25):
    """4-frame chunks (positions differ from get_rope_index after each video): the model's
    native forward given our positions explicitly equals our reference."""
    frames = random_frames(8, seed=2)
    pieces = stream_pieces(q25, frames, 4, 1.0)
    inputs = native_inputs(q25, frames, 4, 1.0)
    _, positions = concat_pieces(q25, pieces)
    with torch.inference_mode():
        native = q25.model(**inputs, position_ids=to_model_position_ids(positions)).logits[0, -1]
        own = q25.model(**inputs).logits[0, -1]
    reference = one_shot_logits(q25, pieces)[0, -1]
    assert torch.allclose(reference, native, atol=TOL, rtol=0)
    assert not torch.allclose(reference, own, atol=TOL, rtol=0)  # the rules really differ here


@pytest.mark.parametrize(
    "name, chunk, n_frames, fps",
    [
        ("q25", 2, 8, None),
        ("q25", 4, 8, 0.5),
        ("q25", 4, 7, None),
        ("q3", 4, 8, None),
        ("q3", 4, 7, 2.0),
        ("q3", 2, 6, 1.0),
    ],
)
def test_streaming_equals_one_shot(request, name, chunk, n_frames, fps):
    adapter = request.getfixturevalue(name)
    frames = random_frames(n_frames, seed=3)
    session = StreamingSession(adapter, chunk_frames=chunk, fps=fps, system_prompt=SYSTEM)
    session.add_frames(frames)
    streamed = session.next_token_logits(QUESTION)
    pieces = [adapter.prefix_piece(session.system_prompt)]
    for i in range(0, n_frames, chunk):
        j = min(i + chunk, n_frames)
        pieces.append(
            adapter.frames_piece(frames[i:j], i, [k / fps for k in range(i, j)] if fps else None)
        )
    pieces.append(adapter.question_piece(QUESTION))
    reference = one_shot_logits(adapter, pieces)[0, -1]
    assert torch.allclose(streamed, reference, atol=TOL, rtol=0), (streamed - reference).abs().max()
    assert session.store.stream_lengths()[0] == sum(len(p) for p in pieces[1:-1])


def _cat(features) -> torch.Tensor:
    """transformers 5.23 returns per-video tuples, 5.17 one tensor."""
    return features if isinstance(features, torch.Tensor) else torch.cat(features)


def _language_model_with_manual_merge(q3, piece, deepstack: bool) -> torch.Tensor:
    """The Qwen3-VL decoder on a chunk embedded by hand, with or without DeepStack."""
    base = q3.base_model
    ids = piece.input_ids[None]
    with torch.inference_mode():
        out = base.get_video_features(
            piece.model_inputs["pixel_values_videos"],
            piece.model_inputs["video_grid_thw"],
            return_dict=True,
        )
        embeds = base.get_input_embeddings()(ids)
        mask = ids == q3.video_token_id
        embeds = embeds.masked_scatter(mask[..., None], _cat(out.pooler_output))
        extra = {}
        if deepstack:
            extra = {
                "visual_pos_masks": mask,
                "deepstack_visual_embeds": [_cat(f) for f in out.deepstack_features],
            }
        hidden = base.language_model(
            inputs_embeds=embeds, position_ids=to_model_position_ids(piece.positions), **extra
        ).last_hidden_state
    return hidden


def test_qwen3_deepstack_is_exercised(q3):
    piece = q3.frames_piece(random_frames(4, seed=4), 0)
    with torch.inference_mode():
        ours = q3.forward(piece, piece.positions)
    with_ds = _language_model_with_manual_merge(q3, piece, deepstack=True)
    without = _language_model_with_manual_merge(q3, piece, deepstack=False)
    assert torch.allclose(ours, with_ds, atol=1e-5, rtol=0)
    assert (ours - without).abs().max() > 1e-2  # dropping DeepStack changes the output
    # and the text after the video sees it: next-token logits move too
    frames = random_frames(4, seed=4)
    pieces = stream_pieces(q3, frames, 4, None)
    full = one_shot_logits(q3, pieces)[0, -1]
    ds_layers = q3.base_model.visual.deepstack_visual_indexes
    q3.base_model.visual.deepstack_visual_indexes = []
    try:
        merged, positions = concat_pieces(q3, pieces)
        with torch.inference_mode():
            out = q3.base_model(
                input_ids=merged.input_ids[None],
                position_ids=to_model_position_ids(positions),
                pixel_values_videos=merged.model_inputs["pixel_values_videos"],
                video_grid_thw=merged.model_inputs["video_grid_thw"],
            ).last_hidden_state
            no_deepstack = q3.logits(out)[0, -1]
    finally:
        q3.base_model.visual.deepstack_visual_indexes = ds_layers
    assert (full - no_deepstack).abs().max() > 1e-3


# -- re-rotation -----------------------------------------------------------------------
def test_rerotated_key_equals_key_at_new_3d_position(adapter):
    """M-RoPE delta rotation, with the model's own rotary module and apply_rotary_pos_emb:
    sectioned (Qwen2.5-VL) and interleaved (Qwen3-VL) channel layouts."""
    import importlib

    module = importlib.import_module(type(adapter.attention_modules[0]).__module__)
    attn = adapter.attention_modules[1]
    seq = 24
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq, adapter.text_config.hidden_size, generator=gen)
    old = torch.randint(0, 300, (3, seq), generator=gen)
    new = torch.randint(0, 300, (3, seq), generator=gen)
    new[:, :4] = old[:, :4]  # some tokens do not move
    with torch.no_grad():
        k = attn.k_proj(x).view(1, seq, -1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = k.transpose(1, 2)

        def rotated(positions):
            cos, sin = adapter.rotary_emb(x, to_model_position_ids(positions))
            return module.apply_rotary_pos_emb(k, k, cos, sin)[1]

        k_old, k_new = rotated(old), rotated(new)
        moved = rerotate_keys(k_old, old, new, adapter.rotary_emb)
    assert (k_new - k_old).abs().max() > 1e-2
    assert torch.allclose(moved, k_new, atol=1e-5, rtol=0), (moved - k_new).abs().max()
    # a delta on a single axis only moves that axis' channels
    only_h = old.clone()
    only_h[1] += 5
    moved_h = rerotate_keys(k_old, old, only_h, adapter.rotary_emb)
    changed = (moved_h - k_old).abs().amax(dim=(0, 1, 2)) > 1e-6
    assert 0 < int(changed.sum()) < attn.head_dim


# -- retention on a 3D model -------------------------------------------------------------
@pytest.mark.parametrize("name", ["q25", "q3"])
def test_fifo_bounded_and_compact(request, name):
    """A stream whose raw positions would pass the model's limit (0.1 fps: Qwen2.5-VL steps
    40 temporal ids per temporal patch, Qwen3-VL writes long timestamps) stays within the
    budget, compact per axis and below max_position_embeddings."""
    adapter = request.getfixturevalue(name)
    budget = 40
    session = StreamingSession(
        adapter, FifoRetention(budget=budget), chunk_frames=4, fps=0.1, system_prompt=SYSTEM
    )
    frames = random_frames(64, seed=5)
    raw_extent = session.store.next_position(0)
    compressions = 0
    for i in range(0, 64, 4):
        raw_extent += adapter.frames_piece(
            frames[i : i + 4], i, [k / 0.1 for k in range(i, i + 4)]
        ).extent
        report = session.add_frames(frames[i : i + 4])
        compressions += report.compressions
        assert max(session.tokens_kept) <= budget
        if report.compressions:
            for layer in range(adapter.num_layers):
                positions = session.store.positions[layer]
                assert torch.equal(
                    positions, compact_positions(positions, session.store.prefix_len)
                )
        assert session.store.max_position() < adapter.max_positions
    assert raw_extent > adapter.max_positions  # without re-indexing the stream would overflow
    assert compressions >= 10
    frame_index = session.store.frame_index[0][session.store.prefix_len :]
    assert frame_index[frame_index >= 0].min() > 40  # only the newest frames are left
    logits = session.next_token_logits(QUESTION)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["q25", "q3"])
def test_fifo_with_large_budget_equals_full(request, name):
    adapter = request.getfixturevalue(name)
    frames = random_frames(12, seed=6)
    results = []
    for retention in (None, FifoRetention(budget=10_000)):
        session = StreamingSession(
            adapter, retention, chunk_frames=4, fps=1.0, system_prompt=SYSTEM
        )
        session.add_frames(frames)
        results.append(session.next_token_logits(QUESTION))
    assert torch.equal(results[0], results[1])


def test_question_after_odd_flush(q3):
    """A question flushes a 1-frame chunk (shorter than a temporal patch)."""
    frames = random_frames(5, seed=7)
    session = StreamingSession(q3, chunk_frames=4, system_prompt=SYSTEM)
    session.add_frames(frames)
    streamed = session.next_token_logits(QUESTION)
    pieces = [
        q3.prefix_piece(SYSTEM),
        q3.frames_piece(frames[:4], 0),
        q3.frames_piece(frames[4:], 4),
        q3.question_piece(QUESTION),
    ]
    assert pieces[2].frame_index[pieces[2].input_ids == q3.video_token_id].unique().tolist() == [4]
    reference = one_shot_logits(q3, pieces)[0, -1]
    assert torch.allclose(streamed, reference, atol=TOL, rtol=0)


# -- the decoder stack on its own (what ingest CUDA graphs replay) -----------------------------
def test_qwen2_5_input_embeddings_feed_the_decoder_like_the_forward(q25, q3):
    """The chunk embedded with its video features in place (vision tower run here), then
    the language model alone, against the model's own forward of the same chunk."""
    piece = q25.frames_piece(random_frames(4, seed=4), 0, None)
    positions = piece.positions + 7
    with torch.inference_mode():
        whole = q25.forward(piece, positions)
        embeds = q25.input_embeddings(piece)
        split = q25.text_model(inputs_embeds=embeds, position_ids=to_model_position_ids(positions)).last_hidden_state
    assert embeds.shape == (1, len(piece), q25.text_config.hidden_size)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    # text pieces: the token embeddings; Qwen3-VL's DeepStack cannot be split off
    question = q25.question_piece(QUESTION)
    assert torch.equal(q25.input_embeddings(question)[0], q25.text_model.get_input_embeddings()(question.input_ids))
    assert q3.input_embeddings(q3.frames_piece(random_frames(4, seed=4), 0, None)) is None


@pytest.mark.parametrize("rule", ["fifo", "hermes"])
def test_qwen2_5_fixed_buffer_ingest_equals_ordinary_ingest(q25, rule):
    """The body an ingest CUDA graph replays (fixed buffers, per-layer 3D rotary from a
    positions buffer, pseudo-query blocks and their attention), run eagerly, against the
    ordinary session: same cache, same positions, same answer."""
    from hermes_policy.graphs.chunk_graphs import ChunkGraphs
    from hermes_policy.policy import ModelInfo, paper_default
    from hermes_policy.retention import HermesRetention

    frames = random_frames(24, seed=5)
    budget = 3 * q25.tokens_per_frame + 6
    results = []
    for fixed in (False, True):
        if rule == "fifo":
            retention = FifoRetention(budget=budget)
        else:
            retention = HermesRetention(policy=paper_default(ModelInfo.of(q25), budget=budget))
        session = StreamingSession(q25, retention, chunk_frames=4, options=RuntimeOptions(answer_path="static"), system_prompt=SYSTEM)
        if fixed:
            session.chunk_graphs = ChunkGraphs(q25, session.store, use_graphs=False, after=1)
        session.add_frames(frames)
        results.append((session, session.ask(QUESTION, max_new_tokens=5).token_ids))
    (plain, plain_answer), (fixed, fixed_answer) = results
    assert fixed.chunk_graphs.replays > 0 and not fixed.chunk_graphs.failed
    assert fixed_answer == plain_answer
    if rule == "hermes":
        assert fixed.fused_guidance_passes > 0
    for layer in range(q25.num_layers):
        a, b = plain.store.layer(layer), fixed.store.layer(layer)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.frame_index, b.frame_index)
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)
