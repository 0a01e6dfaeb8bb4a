"""Per-KV-head retention in the runtime (``hermes-heads``, head masks): exactness against
written-out references, what each head sees after compression, bounded memory, and the
masks through questions, eviction and both answer paths."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hermes_policy import StreamingSession
from hermes_policy.attention.capture import AttentionCapture
from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.dispatch import ragged_attention
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import PolicyError
from hermes_policy.options import RuntimeOptions
from hermes_policy.policy import HeadPolicy, ModelInfo, paper_default
from hermes_policy.retention import FullRetention, PerHeadRetention, make_rule
from hermes_policy.retention.specs import rule_from_spec


class _Module(torch.nn.Module):
    layer_idx = 0


def frames(adapter, n, seed=0):
    return torch.randint(0, 250, (n, adapter.tokens_per_frame), generator=torch.Generator().manual_seed(seed))


def heads_policy(adapter, budget, heads):
    """A schema-2 policy for ``adapter`` whose every layer has ``heads`` (one per KV head)."""
    base = paper_default(ModelInfo.of(adapter), budget=budget)
    return replace(base, layers=[replace(layer, heads=tuple(heads)) for layer in base.layers])


def streaming_and_retrieval(adapter, budget=24, window=16):
    """KV head 0 streaming (a window), KV head 1 retrieval (HERMES score, the rest)."""
    return heads_policy(adapter, budget, [
        HeadPolicy("streaming", window, None, 1.0, 10.0),
        HeadPolicy("retrieval", None, 1.0, 0.3, 1.0),
    ])


def explicit_attention(query, key, value, scaling, allowed):
    """Softmax attention written out: ``allowed (heads, q, k)`` per query head."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = (query @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


# -- the attention under a head mask -------------------------------------------------------
@pytest.mark.parametrize("mode", ["causal", "one-token", "blocks", "static"])
def test_a_masked_head_attends_as_if_its_keys_were_removed_for_it_alone(mode):
    torch.manual_seed(1)
    heads, kv_heads, cached, dim = 4, 2, 20, 8
    q_len = 1 if mode == "one-token" else 6
    k_len = cached + q_len
    query = torch.randn(1, heads, q_len, dim)
    key, value = torch.randn(1, kv_heads, k_len, dim), torch.randn(1, kv_heads, k_len, dim)
    head_mask = torch.ones(kv_heads, cached, dtype=torch.bool)
    head_mask[0, [3, 7, 19]] = False  # KV head 0 (query heads 0, 1) may not see three tokens
    head_mask[1, :5] = False
    # the path's own query-key mask, written out
    base = torch.ones(q_len, k_len, dtype=torch.bool).tril(cached)
    context = AttentionContext(head_masks=(head_mask,))
    if mode == "blocks":  # a lead of 2 rows, then blocks of 3 and 1 rows (each sees the lead, not the others)
        context = context.with_changes(blocks=(2, (3, 1)))
        base[2:5, cached + 5 :] = False
        base[5, cached + 2 : cached + 5] = False
    if mode == "static":  # a buffer of 32 slots, the new tokens at slots 20..25
        k_len = 32
        key = torch.cat([key, torch.randn(1, kv_heads, k_len - key.shape[2], dim)], dim=2)
        value = torch.cat([value, torch.randn(1, kv_heads, k_len - value.shape[2], dim)], dim=2)
        limits = torch.arange(cached, cached + q_len)
        base = torch.arange(k_len)[None] <= limits[:, None]
        context = context.with_changes(static_limits=limits[None])
    allowed = base[None].repeat(heads, 1, 1)
    for h in range(heads):
        allowed[h, :, :cached] &= head_mask[h // 2]
    capture = AttentionCapture([_Module()], query_rows=slice(q_len - 1, None))
    context = context.with_changes(capture=capture)
    out, _ = ragged_attention(_Module(), query, key, value, None, scaling=0.35, attention_context=context)
    torch.testing.assert_close(out, explicit_attention(query, key, value, 0.35, allowed), atol=1e-6, rtol=1e-5)
    probs = capture.patterns[capture.hook_name(0)]  # the captured row under the same mask
    assert probs[0, 0, -1, 7] == 0 and probs[0, 2, -1, 7] > 0 and probs[0, 3, -1, :5].sum() == 0
    # and a mask that hides nothing is the unmasked attention
    plain, _ = ragged_attention(_Module(), query, key, value, None, scaling=0.35,
                                attention_context=replace(context, head_masks=None, capture=None))
    open_mask = AttentionContext(**{**vars(context), "capture": None, "head_masks": (torch.ones_like(head_mask),)})
    masked, _ = ragged_attention(_Module(), query, key, value, None, scaling=0.35, attention_context=open_mask)
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=1e-5)


def test_masking_every_head_from_a_token_equals_evicting_it(tiny_adapter):
    """Through the whole model: a token no head of any layer may see = a token evicted."""
    stream = frames(tiny_adapter, 6, seed=2)
    masked, evicted = (StreamingSession(tiny_adapter, chunk_frames=3) for _ in range(2))
    for session in (masked, evicted):
        session.add_frames(stream)
    drop = [masked.store.prefix_len + i for i in (0, 5, 17)]
    length = masked.store.length(0)
    kept = torch.tensor([i for i in range(length) if i not in drop])
    masks = {}
    for layer in range(tiny_adapter.num_layers):
        mask = torch.ones(tiny_adapter.num_kv_heads, length, dtype=torch.bool)
        mask[:, drop] = False
        masks[layer] = mask
    masked.store.set_head_masks(masks)
    evicted.store.keep_layers({layer: (kept, None) for layer in range(tiny_adapter.num_layers)})
    full = StreamingSession(tiny_adapter, chunk_frames=3)
    full.add_frames(stream)
    question = "Which frame had the ball?"
    expected = evicted.next_token_logits(question)
    torch.testing.assert_close(masked.next_token_logits(question), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full.next_token_logits(question), expected, atol=1e-3)  # the tokens mattered


# -- the rule -----------------------------------------------------------------------------
def test_a_policy_whose_every_head_keeps_everything_answers_like_full(tiny_adapter):
    stream = frames(tiny_adapter, 24, seed=4)  # 192 stream tokens
    rule = PerHeadRetention(policy=streaming_and_retrieval(tiny_adapter, budget=400, window=300))
    sessions = [StreamingSession(tiny_adapter, r, chunk_frames=4) for r in (rule, FullRetention())]
    for session in sessions:
        session.add_frames(stream)
    assert sessions[0].store.head_masks() is None and sessions[0].compressions == 0
    for question in ("Where is the ball?", "What came first?"):
        assert torch.equal(sessions[0].next_token_logits(question), sessions[1].next_token_logits(question))
    assert sessions[0].ask("Where?", max_new_tokens=6).token_ids == sessions[1].ask("Where?", max_new_tokens=6).token_ids


def test_streaming_heads_see_their_window_and_retrieval_heads_their_share(tiny_adapter):
    rule = PerHeadRetention(policy=streaming_and_retrieval(tiny_adapter, budget=24, window=16), sink=4)
    assert rule.head_tokens(0) == [16, 32]
    session = StreamingSession(tiny_adapter, rule, chunk_frames=2)
    session.add_frames(frames(tiny_adapter, 10, seed=5))  # 80 stream tokens in chunks of 16
    store, prefix = session.store, session.store.prefix_len
    assert session.compressions > 0
    masks = store.head_masks()
    for layer in range(tiny_adapter.num_layers):
        mask = masks[layer]
        assert mask is not None and mask.shape == (2, store.length(layer))
        assert mask[:, :prefix].all()  # the system prefix: every head
        assert store.visible_stream_tokens(layer) == [16, 32]
        union = store.length(layer) - prefix
        assert 32 <= union <= 48
        # the streaming head: the 4 oldest stream tokens held and the 12 newest, nothing else
        seen = mask[0, prefix:]
        assert seen[:4].all() and seen[-12:].all() and not seen[4:-12].any()
        frames_seen = store.frame_index[layer][prefix:][seen]
        assert frames_seen[-12:].tolist() == store.frame_index[layer][-12:].tolist()
        assert int(store.frame_index[layer][-1]) == 9  # the newest frame is held
    # new tokens are seen by every head until the next compression
    session.add_frames(frames(tiny_adapter, 1, seed=6))  # one frame: waits for its chunk
    session.flush()
    assert all(n <= t + 8 for n, t in zip(store.visible_stream_tokens(0), [16, 32], strict=True))


def test_union_stays_bounded_and_memory_flat_over_a_long_stream(tiny_llama_small_limit_dir):
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llama_small_limit_dir, device="cpu", tokens_per_frame=8)
    rule = PerHeadRetention(policy=streaming_and_retrieval(adapter, budget=32, window=16))
    session = StreamingSession(adapter, rule, chunk_frames=4)
    stream = frames(adapter, 240, seed=7)  # 1,920 tokens: past the 1,024 position limit
    allocated, effective = [], []
    for start in range(0, 240, 40):
        session.add_frames(stream[start : start + 40])
        for layer in range(adapter.num_layers):
            assert session.store.stream_lengths()[layer] <= rule.budget_of(layer) == 64
            assert session.store.visible_stream_tokens(layer) == [16, 48]
        allocated.append(session.store.allocated_bytes())
        effective.append(session.store.effective_tokens())
    assert len(set(allocated[1:])) == 1  # no KV memory allocated once at the bound
    assert set(effective) == {adapter.num_layers * (16 + 48)}
    assert session.store.max_position() < adapter.max_positions  # lazy re-indexing kept positions in range


def test_masks_survive_questions_and_follow_eviction(tiny_adapter):
    rule = PerHeadRetention(policy=streaming_and_retrieval(tiny_adapter, budget=24, window=16))
    session = StreamingSession(tiny_adapter, rule, chunk_frames=2, options=RuntimeOptions(answer_path="eager"))
    session.add_frames(frames(tiny_adapter, 8, seed=8))
    before = [m.clone() for m in session.store.head_masks()]
    session.ask("Where is the ball?", max_new_tokens=5)
    session.next_token_logits("And now?")
    for layer, mask in enumerate(session.store.head_masks()):
        assert torch.equal(mask, before[layer])  # the Q/A tokens came and went; the masks did not change


def test_store_masks_through_truncate_and_keep_layers():
    store = KVStore(num_layers=2, position_axes=1)
    keys = torch.randn(1, 2, 10, 4)
    store.cache.update(keys, keys.clone(), 0)
    store.cache.update(keys, keys.clone(), 1)
    store.record_appended([torch.arange(10)[None]] * 2, torch.arange(10))
    mask = torch.rand(2, 8) > 0.5
    mask[0, 0] = False  # not all True
    store.set_head_masks({0: mask})
    assert store.head_masks()[1] is None
    with pytest.raises(ValueError):
        store.set_head_masks({1: torch.ones(2, 11, dtype=torch.bool)})
    store.truncate([6, 10])
    assert torch.equal(store.head_masks()[0], mask[:, :6])
    extra = torch.ones(1, 2, 3, 4)  # three tokens after the mask: every head sees them
    store.append_layers({0: (extra, extra, torch.arange(6, 9)[None], torch.arange(6, 9))})
    assert store.visible_stream_tokens(0) == [int(n) + 3 for n in mask[:, :6].sum(1)]
    store.keep_layers({0: (torch.tensor([1, 2, 5, 7, 8]), None)})
    expected = torch.cat([mask[:, :6], torch.ones(2, 3, dtype=torch.bool)], dim=1)[:, [1, 2, 5, 7, 8]]
    assert torch.equal(store.head_masks()[0], expected)
    store.set_head_masks({0: torch.ones(2, 5, dtype=torch.bool)})  # all True: no mask
    assert store.head_masks() is None


@pytest.mark.parametrize("fewer_kernels", [True, False])
def test_static_and_eager_answers_agree_under_masks(tiny_adapter, fewer_kernels, monkeypatch):
    stream = frames(tiny_adapter, 12, seed=9)
    questions = ("Where is the ball?", "And the cat?")
    logits: list[torch.Tensor] = []  # every logits call's last row (the first one: the question's)
    plain_logits = tiny_adapter.logits

    def recorded(hidden):
        out = plain_logits(hidden)
        logits.append(out[0, -1].float().clone())
        return out

    monkeypatch.setattr(tiny_adapter, "logits", recorded)
    answers, first = {}, {}
    for path in ("eager", "static", "static-unmasked"):
        rule = PerHeadRetention(policy=streaming_and_retrieval(tiny_adapter, budget=24, window=8))
        session = StreamingSession(tiny_adapter, rule, chunk_frames=2, options=RuntimeOptions(answer_path=path.split("-")[0]))
        session.add_frames(stream)
        assert session.store.head_masks() is not None
        if path == "static-unmasked":
            session.store.set_head_masks({layer: None for layer in range(tiny_adapter.num_layers)})
        if path != "eager":
            session.answer_graphs.fewer_kernels = fewer_kernels
        answers[path], first[path] = [], []
        for question in questions:
            logits.clear()
            answers[path].append(session.ask(question, max_new_tokens=8).token_ids)
            first[path].append(logits[0])
    assert answers["static"] == answers["eager"]
    for static, eager, unmasked in zip(first["static"], first["eager"], first["static-unmasked"], strict=True):
        torch.testing.assert_close(static, eager, atol=1e-4, rtol=1e-4)
        assert (unmasked - eager).abs().max() > 1e-2  # the masks changed the logits: the static path applied them


def test_rule_registry_specs_and_refusals(tiny_adapter, tmp_path):
    policy = streaming_and_retrieval(tiny_adapter)
    assert isinstance(make_rule("hermes-heads", policy=policy), PerHeadRetention)
    path = policy.save(tmp_path / "v2.json")
    assert isinstance(rule_from_spec(str(path), tiny_adapter), PerHeadRetention)
    v1 = paper_default(ModelInfo.of(tiny_adapter), budget=24)
    assert type(rule_from_spec(str(v1.save(tmp_path / "v1.json")), tiny_adapter)).__name__ == "HermesRetention"
    with pytest.raises(PolicyError, match="hermes-policy/2"):
        PerHeadRetention(policy=v1)
    rule = PerHeadRetention(policy=policy)
    assert rule.layer_prompt() == (1, 1, 0)  # every layer's retrieval head scores by attention
    streaming_only = heads_policy(tiny_adapter, 24, [HeadPolicy("streaming", 16, None, 1.0, 1.0)] * 2)
    assert PerHeadRetention(policy=streaming_only).guidance(None, []) is None


def test_fidelity_runs_a_schema_2_policy_per_head(tiny_adapter):
    from hermes_probe.fidelity import contenders, label

    policy = streaming_and_retrieval(tiny_adapter, budget=24, window=16)
    (heads,) = contenders([], {"h": policy}, ModelInfo.of(tiny_adapter))
    assert heads.rule == "hermes-heads" and label({"rule": heads.rule, "policy": "h"}) == "hermes-heads (h)"
    rule = heads.make(48)  # the budget doubled: windows scale with it, tokens per head sum to 2 x 48
    assert isinstance(rule, PerHeadRetention) and rule.head_tokens(0) == [32, 64]
