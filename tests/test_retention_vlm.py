"""Retention rules (HERMES and the baselines) on the three vision adapters.

LLaVA-OneVision (1D RoPE, one newline token per chunk), Qwen2.5-VL (sectioned 3D M-RoPE)
and Qwen3-VL (interleaved 3D M-RoPE, DeepStack, text timestamps), all tiny and random, fp32
on CPU. Ground truths that do not come from the runtime: the model's own rotary module and
``apply_rotary_pos_emb`` (keys are recomputed from the un-rotated projections captured with
a forward hook), the full cache (for rules that never evict), and plain counting.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from tiny_llava_ov import tiny_llava_onevision
from tiny_qwen_vl import FRAME_HEIGHT, FRAME_WIDTH, tiny_qwen2_5_vl, tiny_qwen3_vl

from hermes_policy import StreamingSession
from hermes_policy.models import load_adapter
from hermes_policy.policy import Guidance, ModelInfo, paper_default
from hermes_policy.retention import (
    AttentionRetention,
    FifoRetention,
    FullRetention,
    GuidanceRequest,
    HermesRetention,
    SinkRecentRetention,
    UniformRetention,
)

SYSTEM = "You watch a stream."
QUESTION = "What moved?"
MAX_POSITIONS = 512
CHUNK = 4
MODELS = ["llava", "q25", "q3"]
MODELS_3D = ["q25", "q3"]
# Short pseudo-queries (the paper's ablation: wording barely matters). With the byte-level
# test tokenizer the paper's prompts are ~260 tokens, so with a 512-position model the lazy
# rule would have to compact before almost every guidance pass; short ones let positions
# really grow between lazy re-indexings.
SHORT_GUIDANCE = Guidance(
    local="Describe now.",
    global_="Summarize.",
    local_with_history="Recent: {history}. Describe now.",
    global_with_history="Context: {history}. Summarize.",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory):
    folder = tiny_llava_onevision(
        tmp_path_factory.mktemp("rv_llava_ov"), layers=3, max_positions=MAX_POSITIONS
    )
    return load_adapter(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def q25(tmp_path_factory: pytest.TempPathFactory):
    folder = tiny_qwen2_5_vl(tmp_path_factory.mktemp("rv_qwen2_5_vl"), max_positions=MAX_POSITIONS)
    adapter = load_adapter(folder, device="cpu")
    adapter.frame_size = (FRAME_HEIGHT, FRAME_WIDTH)  # tokens_per_frame before the first chunk
    return adapter


@pytest.fixture(scope="module")
def q3(tmp_path_factory: pytest.TempPathFactory):
    folder = tiny_qwen3_vl(tmp_path_factory.mktemp("rv_qwen3_vl"), max_positions=MAX_POSITIONS)
    adapter = load_adapter(folder, device="cpu")
    adapter.frame_size = (FRAME_HEIGHT, FRAME_WIDTH)
    return adapter


def random_frames(adapter, n: int, seed: int = 0) -> np.ndarray:
    size = (24, 32) if adapter.position_axes == 1 else (FRAME_HEIGHT, FRAME_WIDTH)
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def hermes(adapter, budget: int, reindex: str = "lazy", weights=None, short: bool = False):
    policy = paper_default(
        ModelInfo.of(adapter), budget=budget, reindex=reindex, budget_weights=weights
    )
    if short:
        policy = dataclasses.replace(policy, guidance=SHORT_GUIDANCE)
    return HermesRetention(policy=policy)


def make_rule(adapter, name: str, budget: int):
    if name == "hermes":
        return hermes(adapter, budget)
    if name == "hermes-eager":
        return hermes(adapter, budget, "eager")
    return {
        "fifo": FifoRetention,
        "sink+recent": SinkRecentRetention,
        "uniform": UniformRetention,
        "attention-only": AttentionRetention,
    }[name](budget=budget)


def rope_module(adapter):
    """The transformers modeling module of the text attention (its apply_rotary_pos_emb)."""
    return importlib.import_module(type(adapter.attention_modules[0]).__module__)


def rope(adapter, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Keys ``x`` (batch, heads, seq, head_dim) rotated to ``positions`` (axes, seq) with the
    model's own rotary module and apply_rotary_pos_emb (M-RoPE layouts come from the module)."""
    ids = positions if positions.shape[0] == 1 else positions[:, None, :]
    cos, sin = adapter.rotary_emb(x, ids)
    return rope_module(adapter).apply_rotary_pos_emb(x, x, cos, sin)[1]


class RawKeys:
    """Hook the un-rotated keys of one layer during ordinary prefills (no pseudo-queries).

    Qwen3-VL normalises keys (k_norm) before RoPE, so its hook sits on k_norm; the others
    rotate k_proj's output directly.
    """

    def __init__(self, adapter, layer: int):
        attention = adapter.attention_modules[layer]
        module = attention.k_norm if hasattr(attention, "k_norm") else attention.k_proj
        self.chunks: list[torch.Tensor] = []
        blocks: list = [None]  # the query blocks of the forward running (from its attention context)

        def context(mod, args, kwargs):
            attention_context = kwargs.get("attention_context")
            blocks[0] = None if attention_context is None else attention_context.blocks

        def record(mod, args, output):
            out = output.view(1, output.shape[1], -1, attention.head_dim).transpose(1, 2)
            if blocks[0] is not None:  # pseudo-queries: keep only a chunk riding with them
                out = out[..., : blocks[0][0], :]
            if out.shape[-2]:
                self.chunks.append(out.detach().clone())

        self.handles = [
            attention.register_forward_pre_hook(context, with_kwargs=True),
            module.register_forward_hook(record),
        ]

    def take(self) -> torch.Tensor:
        """Everything recorded since the last call, concatenated along the sequence."""
        out = torch.cat(self.chunks, dim=-2)
        self.chunks.clear()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Spy:
    """Wrap a rule's select: snapshot every layer as it was when the rule decided."""

    def __init__(self, rule):
        self.calls = []
        original = rule.select

        def select(store, context):
            snapshot = [
                (
                    store.cache.layers[i].keys.clone(),
                    store.cache.layers[i].values.clone(),
                    store.positions[i].clone(),
                )
                for i in range(store.num_layers)
            ]
            decision = original(store, context)
            self.calls.append((snapshot, decision))
            return decision

        rule.select = select


def session_for(adapter, rule, fps=None) -> StreamingSession:
    return StreamingSession(adapter, rule, chunk_frames=CHUNK, fps=fps, system_prompt=SYSTEM)


# -- 1. a budget larger than the stream changes nothing ------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_large_budget_answers_exactly_like_full(request, model):
    adapter = request.getfixturevalue(model)
    frames = random_frames(adapter, 12, seed=1)
    reference = session_for(adapter, FullRetention(), fps=1.0)
    reference.add_frames(frames)
    expected_logits = reference.next_token_logits(QUESTION)
    expected_tokens = reference.ask(QUESTION, max_new_tokens=4).token_ids
    names = ["hermes", "hermes-eager", "fifo", "sink+recent", "uniform", "attention-only"]
    for name in names:
        session = session_for(adapter, make_rule(adapter, name, 10_000), fps=1.0)
        session.add_frames(frames)
        assert session.compressions == 0 and session.guidance_passes == 0, name
        assert torch.equal(session.store.positions[0], reference.store.positions[0]), name
        assert torch.equal(session.next_token_logits(QUESTION), expected_logits), name
        assert session.ask(QUESTION, max_new_tokens=4).token_ids == expected_tokens, name


# -- 2. a long stream under a small budget -------------------------------------------------
RULES_SMALL = ["hermes-lazy", "hermes-eager", "fifo", "sink+recent", "uniform", "attention-only"]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", RULES_SMALL)
@pytest.mark.parametrize("model", MODELS)
def test_small_budget_long_stream(request, model, name):
    """Every layer within its own budget, positions below the model's limit although the raw
    stream passes it, the prefix untouched, questions answered; no position warning."""
    adapter = request.getfixturevalue(model)
    if name == "hermes-lazy":  # layer-dependent budgets (ragged layers), short pseudo-queries
        rule = hermes(adapter, 30, "lazy", weights=[1, 1, 2], short=True)
    elif name == "hermes-eager":  # the paper's prompts and equal budgets
        rule = hermes(adapter, 30, "eager")
    else:
        rule = make_rule(adapter, name, 30)
    fps = None if model == "llava" else 0.1  # Qwen: 0.1 fps stretches t ids / timestamps
    n_frames = 60
    frames = random_frames(adapter, n_frames, seed=2)
    session = session_for(adapter, rule, fps=fps)
    prefix = session.store.prefix_len
    prefix_state = [
        (layer.keys.clone(), layer.values.clone(), positions.clone())
        for layer, positions in zip(session.store.cache.layers, session.store.positions)
    ]
    raw_extent = session.store.next_position(0)
    budgets = [rule.budget_of(layer) for layer in range(adapter.num_layers)]
    highest, gaps_seen, drops = [], False, 0
    for i in range(0, n_frames, CHUNK):
        times = [k / fps for k in range(i, i + CHUNK)] if fps else None
        raw_extent += adapter.frames_piece(frames[i : i + CHUNK], i, times).extent
        session.add_frames(frames[i : i + CHUNK])
        kept = session.tokens_kept
        assert all(n <= b for n, b in zip(kept, budgets)), (kept, budgets)
        top = session.store.max_position()
        assert top < adapter.max_positions
        if highest and top < highest[-1]:
            drops += 1
        highest.append(top)
        if session.compressions:  # gaps left by evictions (or by the chunks themselves)
            gaps_seen |= any(
                int(positions[:, prefix:].max()) - prefix + 1 > n
                for positions, n in zip(session.store.positions, kept)
            )
        if i == 28 and name == "hermes-lazy":  # a Q/A in history: rewritten pseudo-queries
            session.ask(QUESTION, max_new_tokens=2)
    assert raw_extent > adapter.max_positions  # without re-indexing the stream would pass it
    assert session.compressions >= 10
    if name == "hermes-lazy":
        assert len(set(kept)) > 1  # layer-dependent budgets really give ragged layers
        assert gaps_seen and drops >= 1  # positions grew with gaps, then were compacted
    if name.startswith("hermes"):  # re-indexing never costs a separate pseudo-query pass
        assert session.guidance_passes == session.fused_guidance_passes > 0
    if rule.reindex == "eager":  # every layer is over budget after every chunk: all compacted
        assert not gaps_seen
    # the system prefix: never evicted, never moved
    assert session.store.prefix_len == prefix
    for layer, (keys, values, positions) in enumerate(prefix_state):
        cache = session.store.cache.layers[layer]
        assert torch.equal(cache.keys[..., :prefix, :], keys)
        assert torch.equal(cache.values[..., :prefix, :], values)
        assert torch.equal(session.store.positions[layer][:, :prefix], positions)
    lengths = session.store.lengths()
    answer = session.ask(QUESTION, max_new_tokens=3)
    assert answer.frames_seen == n_frames and answer.tokens_kept == kept
    assert session.store.lengths() == lengths
    assert torch.isfinite(session.next_token_logits(QUESTION)).all()


# -- 3. summary tokens on 3D models --------------------------------------------------------
@pytest.mark.parametrize("model", MODELS_3D)
def test_summary_token_is_the_mean_of_evicted_keys_moved_to_its_position(request, model):
    adapter = request.getfixturevalue(model)
    rule = hermes(adapter, 16, "lazy")
    spy = Spy(rule)
    deep = adapter.num_layers - 1
    assert rule.policy.layers[deep].summary_token and not rule.policy.layers[1].summary_token
    raw = RawKeys(adapter, deep)
    try:
        session = session_for(adapter, rule)
        frames = random_frames(adapter, 12, seed=3)
        raw_first = None
        for i in range(0, 12, CHUNK):
            session.add_frames(frames[i : i + CHUNK])
            if spy.calls and raw_first is None:
                raw_first = raw.take()  # prefix + chunks up to the first compression
    finally:
        raw.remove()
    assert len(spy.calls) >= 2  # the later ones fold an older summary token in too
    prefix = session.store.prefix_len
    for n, (snapshot, decision) in enumerate(spy.calls):
        keys, values, positions = snapshot[deep]
        keep = decision[deep]
        kept = set(keep.indices.tolist())
        evicted = [i for i in range(prefix, keys.shape[-2]) if i not in kept]
        assert len(evicted) == keys.shape[-2] - prefix - 15  # 15 kept + 1 summary = budget
        summary = keep.summary
        # stored position: (axes, 1), all axes one past the kept tokens' max
        kept_max = int(positions[:, keep.indices].max())
        assert summary.position.shape == (3, 1)
        assert summary.position.tolist() == [[kept_max + 1]] * 3
        # each evicted key moved by (summary - its position) with the model's RoPE
        moved = [
            rope(adapter, keys[..., i : i + 1, :], summary.position - positions[:, i : i + 1])
            for i in evicted
        ]
        expected = torch.stack(moved).mean(0)
        torch.testing.assert_close(summary.key, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            summary.value, values[..., evicted, :].mean(-2, keepdim=True), atol=1e-6, rtol=1e-6
        )
        if n == 0:  # before any eviction: also from the un-rotated keys, rotated once
            assert raw_first.shape == keys.shape
            direct = rope(
                adapter, raw_first[..., evicted, :], summary.position.expand(-1, len(evicted))
            )
            torch.testing.assert_close(
                summary.key, direct.mean(-2, keepdim=True), atol=1e-5, rtol=1e-5
            )
    # what the store holds after the last compression: the summary, last, at its position
    stored = session.store.cache.layers[deep]
    last = spy.calls[-1][1][deep].summary
    assert torch.equal(stored.keys[..., -1:, :], last.key)
    assert torch.equal(stored.values[..., -1:, :], last.value)
    assert torch.equal(session.store.positions[deep][:, -1:], last.position)
    assert session.store.frame_index[deep][-1] == -1
    assert session.tokens_kept[deep] == 16
    assert all(decision[0].summary is None for _, decision in spy.calls)  # shallow: none


# -- 4. eager re-indexing (3D models; LLaVA as the 1D case) ------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_eager_reindex_keys_equal_keys_computed_at_new_positions(request, model):
    """Over several compressions, a working layer's cached keys equal its un-rotated keys
    rotated once, directly, to the per-axis compacted positions."""
    adapter = request.getfixturevalue(model)
    layer = 1
    rule = hermes(adapter, 20, "eager")
    spy = Spy(rule)
    raw = RawKeys(adapter, layer)
    try:
        session = session_for(adapter, rule, fps=0.5)
        prefix = session.store.prefix_len
        tracked = raw.take()  # the prefix
        frames = random_frames(adapter, 16, seed=4)
        for i in range(0, 16, CHUNK):
            calls = len(spy.calls)
            session.add_frames(frames[i : i + CHUNK])
            tracked = torch.cat([tracked, raw.take()], dim=-2)
            if len(spy.calls) > calls:
                snapshot, decision = spy.calls[-1]
                keep = decision[layer]
                assert keep.summary is None
                old = snapshot[layer][2][:, keep.indices]
                new = session.store.positions[layer]
                # per axis: an order-preserving map onto a contiguous range after the prefix
                stream_old, stream_new = old[:, prefix:], new[:, prefix:]
                for axis in range(new.shape[0]):
                    o, w = stream_old[axis], stream_new[axis]
                    assert torch.equal(
                        torch.sign(o[:, None] - o[None]), torch.sign(w[:, None] - w[None])
                    )
                    assert w.unique().tolist() == list(
                        range(int(new[:, :prefix].max()) + 1, int(w.max()) + 1)
                    )
                assert torch.equal(new[:, :prefix], old[:, :prefix])
                tracked = tracked[..., keep.indices, :]
            assert tracked.shape == session.store.cache.layers[layer].keys.shape
            expected = rope(adapter, tracked, session.store.positions[layer])
            torch.testing.assert_close(
                session.store.cache.layers[layer].keys, expected, atol=2e-5, rtol=1e-5
            )
    finally:
        raw.remove()
    assert len(spy.calls) >= 2


# -- 5. the pseudo-query pass with 3D positions --------------------------------------------
@pytest.mark.parametrize("model", MODELS_3D)
def test_guidance_pass_with_3d_positions(request, model):
    adapter = request.getfixturevalue(model)
    rule = hermes(adapter, 10, "eager", weights=[1, 1, 2])
    session = session_for(adapter, rule, fps=0.5)
    session.add_frames(random_frames(adapter, 12, seed=5))
    store = session.store
    assert session.compressions > 0 and len(set(store.lengths())) > 1  # ragged layers
    assert len({store.next_position(i) for i in range(store.num_layers)}) > 1  # own positions
    before = [
        (
            layer.keys.clone(),
            layer.values.clone(),
            store.positions[i].clone(),
            store.frame_index[i].clone(),
        )
        for i, layer in enumerate(store.cache.layers)
    ]
    request_ = rule.guidance(store, [])
    assert request_.layer_prompt == (None, 1, 0)
    attention = session.guidance_attention(request_)
    stream = store.stream_lengths()
    assert attention[0] is None
    for layer in (1, 2):
        vector = attention[layer]
        assert vector.shape == (stream[layer],)
        assert torch.isfinite(vector).all() and (vector >= 0).all()
        assert not vector.requires_grad  # computed under inference mode, even when called directly
        assert 0 < float(vector.sum()) < 1  # the rest went to the prefix and the prompt
    # no trace left in the cache
    assert store.lengths() == [len(keys[0, 0]) for keys, *_ in before]
    for i, (keys, values, positions, frames) in enumerate(before):
        assert torch.equal(store.cache.layers[i].keys, keys)
        assert torch.equal(store.cache.layers[i].values, values)
        assert torch.equal(store.positions[i], positions)
        assert torch.equal(store.frame_index[i], frames)
    # batched prompts see exactly what each sees alone (block mask, same 3D start per layer)
    global_, mixed = request_.prompts
    alone_global = session.guidance_attention(GuidanceRequest((global_,), (None, None, 0)))
    alone_mixed = session.guidance_attention(GuidanceRequest((mixed,), (None, 0, None)))
    torch.testing.assert_close(attention[2], alone_global[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attention[1], alone_mixed[1], atol=1e-6, rtol=1e-5)
    assert session.ask(QUESTION, max_new_tokens=2).tokens_kept == stream
