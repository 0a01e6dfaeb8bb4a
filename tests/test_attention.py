"""The ragged attention function, attention capture, and per-layer positions, against references."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from reference import concat_pieces
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hermes_policy import StreamingSession
from hermes_policy.attention.capture import AttentionCapture, bottom_right_causal_mask
from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.dispatch import ragged_attention
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.cache.positions import rerotate_keys
from hermes_policy.models import StreamPiece
from hermes_policy.retention import LayerKeep, RetentionRule, SelectContext


class _Module(torch.nn.Module):
    layer_idx = 0


def reference_attention(query, key, value, scaling):
    """Plain softmax attention with bottom-right causal alignment, written out."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = query @ k.transpose(-1, -2) * scaling
    q_len, k_len = query.shape[-2], key.shape[-2]
    for i in range(q_len):
        scores[..., i, k_len - q_len + i + 1 :] = float("-inf")
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (1, 37), (5, 5), (5, 40), (16, 23)])
def test_ragged_attention_matches_reference(q_len, k_len):
    torch.manual_seed(q_len * 100 + k_len)
    query = torch.randn(1, 4, q_len, 8)
    key, value = torch.randn(1, 2, k_len, 8), torch.randn(1, 2, k_len, 8)
    out, _ = ragged_attention(_Module(), query, key, value, None, scaling=0.3)
    torch.testing.assert_close(out, reference_attention(query, key, value, 0.3), atol=1e-6, rtol=1e-5)


def test_bottom_right_mask():
    mask = bottom_right_causal_mask(2, 4, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_capture_of_chosen_layers_records_only_those(tiny_adapter):
    """``layers=`` limits the capture to those layers (the others record nothing), with the
    same probabilities an all-layer capture records there."""
    session = StreamingSession(tiny_adapter, chunk_frames=1)
    piece = StreamPiece.text(torch.randint(0, 200, (12,)), 1)
    lengths = session.store.lengths()
    everything = AttentionCapture(tiny_adapter.attention_modules, query_rows=slice(-3, None))
    session._prefill(piece, attention=AttentionContext(capture=everything))
    session.store.truncate(lengths)
    chosen = AttentionCapture(tiny_adapter.attention_modules, layers=[1], query_rows=slice(-3, None))
    session._prefill(piece, attention=AttentionContext(capture=chosen))
    assert list(chosen.patterns) == [AttentionCapture.hook_name(1)] and chosen.calls == 1
    name = AttentionCapture.hook_name(1)
    torch.testing.assert_close(chosen.patterns[name], everything.patterns[name])


def test_capture_equals_eager_attention_weights(tiny_adapter):
    """Captured per-head probabilities equal transformers' own eager attention weights."""
    model = tiny_adapter.model
    ids = torch.randint(0, 200, (1, 30))
    session = StreamingSession(tiny_adapter, chunk_frames=1)
    piece = StreamPiece.text(ids[0], 1)
    capture = AttentionCapture(tiny_adapter.attention_modules, query_rows=slice(-7, None))
    session._prefill(piece, attention=AttentionContext(capture=capture))
    model.set_attn_implementation("eager")
    try:
        # The same tokens after the same prefix, one forward, eager attention.
        prefix_ids = tiny_adapter.prefix_piece(session.system_prompt).input_ids
        all_ids = torch.cat([prefix_ids, ids[0]])[None]
        out = model(input_ids=all_ids, output_attentions=True)
    finally:
        from hermes_policy.models import use_ragged_attention

        use_ragged_attention(model)
    for layer, eager in enumerate(out.attentions):
        got = capture.patterns[AttentionCapture.hook_name(layer)]
        assert got.shape == (1, tiny_adapter.num_heads, 7, all_ids.shape[1])
        torch.testing.assert_close(got, eager[:, :, -7:].float(), atol=1e-5, rtol=1e-4)
    # with row weights: the weighted sum over the rows of the mean over heads
    weights = torch.linspace(0.0, 1.0, 7) / torch.linspace(0.0, 1.0, 7).sum()
    lengths = session.store.lengths()
    session.store.truncate([n - 30 for n in lengths])
    row_weights = {layer: weights for layer in range(len(out.attentions))}
    capture = AttentionCapture(tiny_adapter.attention_modules, query_rows=slice(-7, None), row_weights=row_weights)
    session._prefill(piece, attention=AttentionContext(capture=capture))
    for layer, eager in enumerate(out.attentions):
        got = capture.patterns[AttentionCapture.hook_name(layer)]
        expected = (eager[:, :, -7:].float().mean(dim=1, keepdim=True) * weights[:, None]).sum(dim=-2, keepdim=True)
        assert got.shape == (1, 1, 1, all_ids.shape[1])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@dataclass
class RaggedTestRule(RetentionRule):
    """Once, keeps a different subset in every layer (always the newest token)."""

    name = "ragged-test"
    reindex: str = "lazy"

    def needs_compression(self, store: KVStore, upcoming: int = 0) -> bool:
        return True

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        if len(set(store.lengths())) > 1:  # already compressed once
            return {}
        decisions = {}
        for layer in range(store.num_layers):
            length, prefix = store.length(layer), store.prefix_len
            stream = torch.arange(prefix, length)
            keep = stream[(stream + layer) % (layer + 2) != 0]
            keep = torch.unique(torch.cat([keep, torch.tensor([length - 1])]))
            decisions[layer] = LayerKeep(torch.cat([torch.arange(prefix), keep]))
        return decisions


def test_ragged_layers_equal_a_masked_one_shot_forward(tiny_adapter):
    """Layers that evicted different tokens (positions untouched) give exactly the logits of
    one forward in which each layer's queries after the eviction cannot see what it evicted."""
    torch.manual_seed(3)
    frames = torch.randint(0, 200, (4, tiny_adapter.tokens_per_frame))
    session = StreamingSession(tiny_adapter, RaggedTestRule(), chunk_frames=2)
    prefix = tiny_adapter.prefix_piece(session.system_prompt)
    chunk1 = tiny_adapter.frames_piece(frames[:2], 0)
    session.add_frames(frames[:2])  # one compression: layers now hold different tokens
    assert len(set(session.store.lengths())) == tiny_adapter.num_layers
    kept = [session.store.positions[layer][0].tolist() for layer in range(tiny_adapter.num_layers)]
    chunk2 = tiny_adapter.frames_piece(frames[2:], 2)
    session.add_frames(frames[2:])
    question = tiny_adapter.question_piece("What happened?")
    logits = session.next_token_logits("What happened?")
    single = StreamPiece.text([17], 1)  # and a single new token (q == 1 path)
    with torch.inference_mode():
        single_logits = tiny_adapter.logits(session._prefill(single))[0, -1]

    merged, positions = concat_pieces(tiny_adapter, [prefix, chunk1, chunk2, single])
    merged_q, positions_q = concat_pieces(tiny_adapter, [prefix, chunk1, chunk2, question])
    seen_before = len(prefix) + len(chunk1)

    def masked_logits(piece, pos):
        total = len(piece)
        masks = []
        for layer in range(tiny_adapter.num_layers):
            allowed = torch.ones(total, total, dtype=torch.bool).tril()
            evicted = torch.tensor([p not in set(kept[layer]) for p in range(seen_before)])
            allowed[seen_before:, :seen_before] &= ~evicted
            masks.append(allowed)

        def masked_attention(module, query, key, value, attention_mask, scaling=None, **kw):
            mask = masks[module.layer_idx]
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                 enable_gqa=True)
            return out.transpose(1, 2), None

        AttentionInterface.register("test_masked", masked_attention)
        AttentionMaskInterface.register("test_masked", lambda *a, **k: None)
        tiny_adapter.model.set_attn_implementation("test_masked")
        try:
            with torch.inference_mode():
                return tiny_adapter.logits(tiny_adapter.forward(piece, pos))[0, -1]
        finally:
            from hermes_policy.models import use_ragged_attention

            use_ragged_attention(tiny_adapter.model)

    torch.testing.assert_close(logits, masked_logits(merged_q, positions_q), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single_logits, masked_logits(merged, positions), atol=1e-4, rtol=1e-4)


def test_per_layer_positions_equal_a_rigidly_shifted_cache(tiny_adapter):
    """After eager re-indexing, layers of different lengths place new tokens at different
    positions (per-layer rotary). Shifting every layer rigidly so that all agree (keys moved
    by the rotary delta) must give the same result through the shared-rotary path."""
    torch.manual_seed(4)
    rule = RaggedTestRule(reindex="eager")
    frames = torch.randint(0, 200, (2, tiny_adapter.tokens_per_frame))
    session = StreamingSession(tiny_adapter, rule, chunk_frames=2)
    session.add_frames(frames)
    next_positions = [session.store.next_position(layer) for layer in range(tiny_adapter.num_layers)]
    assert len(set(next_positions)) > 1, "the test needs layers at different positions"

    shifted = StreamingSession(tiny_adapter, rule, chunk_frames=2)
    shifted.store = copy.deepcopy(session.store)
    shifted.frames_seen = session.frames_seen
    target = max(next_positions)
    for layer, nxt in enumerate(next_positions):
        old = shifted.store.positions[layer]
        new = old + (target - nxt)
        cache_layer = shifted.store.cache.layers[layer]
        cache_layer.keys.copy_(rerotate_keys(cache_layer.keys, old, new, tiny_adapter.rotary_emb))
        shifted.store.positions[layer] = new

    piece = tiny_adapter.question_piece("Where is the ball?")
    with torch.inference_mode():
        per_layer = session._prefill(piece)
        uniform = shifted._prefill(piece)
    assert not torch.equal(session.store.positions[0][:, -1], session.store.positions[1][:, -1])
    torch.testing.assert_close(per_layer, uniform, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lead, cached", [(3, 9), (0, 9), (3, 0), (0, 0)])
def test_lead_and_blocks_attention_equals_one_masked_attention(lead, cached):
    from hermes_policy.attention.blocks import lead_and_blocks_attention
    from hermes_policy.attention.masks import block_query_mask

    g = torch.Generator().manual_seed(5)
    blocks = [4, 2, 5]
    q_len = lead + sum(blocks)
    k_len = cached + q_len
    query = torch.randn(1, 6, q_len, 8, generator=g)
    key = torch.randn(1, 2, k_len, 8, generator=g)
    value = torch.randn(1, 2, k_len, 8, generator=g)
    mask = block_query_mask(blocks, k_len, query.device, lead)
    reference = F.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask, scale=0.3
    )
    out, probs = lead_and_blocks_attention(query, key, value, lead, blocks, 0.3, keep_rows=(4, 6))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    if lead:  # two parts joined in the output projection's layout: its transpose copies nothing
        assert out.transpose(1, 2).is_contiguous()
    seen = k_len - sum(blocks)
    if not seen:  # nothing before the blocks: no probabilities to give
        assert probs is None
        return
    # block 1's probabilities over the keys before the blocks, normalised over all it sees
    scores = (query @ key.repeat_interleave(3, 1).transpose(-1, -2)) * 0.3
    full = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)[:, :, lead + 4 : lead + 6]
    assert probs.shape == (1, 6, 2, seen) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, full[..., :seen], atol=1e-6, rtol=1e-5)
    _, mean = lead_and_blocks_attention(query, key, value, lead, blocks, 0.3, keep_rows=(5, 6), head_mean=True)
    torch.testing.assert_close(mean, full[:, :, 1:, :seen].mean(dim=1, keepdim=True), atol=1e-6, rtol=1e-5)
    # the lead's output unread (an ingest forward's last layer): the blocks' rows and the
    # probabilities as before
    out_blocks, unread = lead_and_blocks_attention(query, key, value, lead, blocks, 0.3, keep_rows=(4, 6), lead_read=False)
    torch.testing.assert_close(out_blocks[:, :, lead:], reference[:, :, lead:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unread, probs, atol=0, rtol=0)
    # rows weighed (a padded prompt's mean over its real rows): one row, in the same kernel
    weights = torch.tensor([0.75, 0.25])
    _, weighed = lead_and_blocks_attention(query, key, value, lead, blocks, 0.3, keep_rows=(4, 6), row_weights=weights)
    expected = (full[..., :seen].mean(dim=1, keepdim=True) * weights[:, None]).sum(dim=-2, keepdim=True)
    assert weighed.shape == (1, 1, 1, seen)
    torch.testing.assert_close(weighed, expected, atol=1e-6, rtol=1e-5)


def test_unmasked_attention_and_own_blocks_give_the_log_sum_exp():
    from hermes_policy.attention.blocks import own_blocks_attention
    from hermes_policy.attention.lse import unmasked_attention_with_lse
    from hermes_policy.attention.masks import block_rows_mask

    g = torch.Generator().manual_seed(6)
    query = torch.randn(1, 6, 7, 8, generator=g)
    key, value = torch.randn(2, 1, 2, 7, 8, generator=g)
    scores = query @ key.repeat_interleave(3, 1).transpose(-1, -2) * 0.5
    out, lse = unmasked_attention_with_lse(query, key, value, 0.5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ value.repeat_interleave(3, 1), atol=1e-5, rtol=1e-5)
    blocked = scores.masked_fill(~block_rows_mask([3, 4], 7, query.device), float("-inf"))
    out, lse = own_blocks_attention(query, key, value, [3, 4], 0.5)
    torch.testing.assert_close(lse, torch.logsumexp(blocked, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(blocked, -1) @ value.repeat_interleave(3, 1), atol=1e-5, rtol=1e-5)


def test_merged_parts_equal_attention_over_all_keys():
    """Attention over a cache and over a chunk's own keys, merged by log-sum-exp, is the
    bottom-right causal attention over both (the split the CUDA path uses)."""
    from hermes_policy.attention.lse import attention_with_lse, merge_attention

    torch.manual_seed(0)
    cache, q_len = 23, 9
    query = torch.randn(1, 6, q_len, 16, dtype=torch.float64)
    key = torch.randn(1, 2, cache + q_len, 16, dtype=torch.float64)
    value = torch.randn(1, 2, cache + q_len, 16, dtype=torch.float64)
    scaling = 16**-0.5
    out_cache, lse_cache = attention_with_lse(query, key[:, :, :cache], value[:, :, :cache], scaling, causal=False)
    out_new, lse_new = attention_with_lse(query, key[:, :, cache:], value[:, :, cache:], scaling, causal=True)
    merged = merge_attention(out_cache, lse_cache, out_new, lse_new)
    expected = reference_attention(query, key, value, scaling).transpose(1, 2)
    torch.testing.assert_close(merged, expected)
    # the log-sum-exp is the normaliser of each row's scores
    groups = 3
    scores = query @ key[:, :, :cache].repeat_interleave(groups, 1).transpose(-1, -2) * scaling
    torch.testing.assert_close(lse_cache, torch.logsumexp(scores, -1))


def test_merge_weighs_parts_by_their_mass():
    """A part whose scores are far lower contributes nothing; equal masses average."""
    from hermes_policy.attention.lse import merge_attention

    a, b = torch.ones(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
    out = merge_attention(a, torch.tensor([[[0.0, 0.0]]]), b, torch.tensor([[[-100.0, 0.0]]]))
    torch.testing.assert_close(out[0, 0, 0], torch.ones(4))
    torch.testing.assert_close(out[0, 0, 1], torch.full((4,), 0.5))


def test_shape_counter_waits_for_recurrence():
    from hermes_policy.attention.shapes import ShapeCounter

    counter = ShapeCounter(after=2, limit=3)
    assert [counter.recurring(("a",)) for _ in range(4)] == [False, False, True, True]
    # a stream of ever-new shapes (a growing cache) never qualifies, and is forgotten
    assert not any(counter.recurring((n,)) for n in range(10))
    assert len(counter.counts) <= 3


def test_canonical_batch_stride_keeps_values():
    from hermes_policy.attention.lse import canonical_batch_stride

    forward = torch.randn(1, 30, 4, 8).transpose(1, 2)  # (batch, heads, seq, dim), as a forward makes it
    lead = forward[:, :, :20]
    other = torch.randn(1, 25, 4, 8).transpose(1, 2)[:, :, :20]
    a, b = canonical_batch_stride(lead), canonical_batch_stride(other)
    assert torch.equal(a, lead) and a.stride() == b.stride()
    assert canonical_batch_stride(torch.randn(2, 3)).stride() == (3, 1)
