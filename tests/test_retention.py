"""Retention rules: the scoring math by hand, a shared matrix of every rule, and HERMES specifics."""

from __future__ import annotations

import math

import pytest
import torch

from hermes_policy import StreamingSession
from hermes_policy.cache.positions import compact_positions
from hermes_policy.errors import PolicyError, RetentionError
from hermes_policy.policy import ModelInfo, paper_default, split_budget
from hermes_policy.retention import (
    AttentionRetention,
    FifoRetention,
    FullRetention,
    HermesRetention,
    SinkRecentRetention,
    UniformRetention,
    make_rule,
)
from hermes_policy.retention.scoring import (
    interpolate_scores,
    min_max,
    mix_scores,
    recency_scores,
    smooth_across_layers,
    top_indices,
)
from hermes_policy.retention.uniform_retention import evenly_spaced


# -- the math, by hand ---------------------------------------------------------------------
def test_recency_scores():
    r = recency_scores(5, 20.0)
    expected = [math.exp(-20 * dt / 4) for dt in (4, 3, 2, 1, 0)]
    torch.testing.assert_close(r, torch.tensor(expected))
    assert recency_scores(1, 20.0).tolist() == [1.0]


def test_min_max_and_mix():
    assert min_max(torch.tensor([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert min_max(torch.tensor([3.0, 3.0])).tolist() == [0.0, 0.0]
    a, r = torch.tensor([0.0, 10.0, 5.0]), torch.tensor([1.0, 2.0, 3.0])
    # S = 0.25 * [0, 1, .5] + 0.75 * [0, .5, 1]
    torch.testing.assert_close(mix_scores(a, r, 0.75), torch.tensor([0.0, 0.625, 0.875]))
    torch.testing.assert_close(mix_scores(None, r, 1.0), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError):
        mix_scores(None, r, 0.5)


def test_cross_layer_smoothing_deep_to_shallow():
    s0, s1, s2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    out = smooth_across_layers([s0, s1, s2], [0.1, 0.3, 0.4])
    torch.testing.assert_close(out[2], s2)
    smoothed1 = 0.7 * s1 + 0.3 * s2  # uses the already-smoothed deeper layer
    torch.testing.assert_close(out[1], smoothed1)
    torch.testing.assert_close(out[0], 0.9 * s0 + 0.1 * smoothed1)


def test_smoothing_of_rows_equals_the_per_layer_smoothing():
    from hermes_policy.retention.scoring import smooth_rows

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(7, 50, generator=g)
    lambdas = (0.1, 0.25, 0.0, 0.5, 0.3, 0.9, 0.2)
    expected = torch.stack(smooth_across_layers(list(scores), list(lambdas)))
    assert torch.equal(smooth_rows(scores, lambdas), expected)  # the same arithmetic, bit for bit


def test_smoothing_interpolates_different_lengths():
    deeper = torch.tensor([0.0, 1.0])  # 2 tokens, resampled to 3: [0, .5, 1]
    torch.testing.assert_close(interpolate_scores(deeper, 3), torch.tensor([0.0, 0.5, 1.0]))
    out = smooth_across_layers([torch.zeros(3), deeper], [0.5, 0.4])
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.25, 0.5]))


def test_budget_split_gives_the_remainder_to_the_last_layer():
    # total 3 * 10 = 30: floor(7.5) = 7, 7, floor(15) = 15 -> remainder 1 to the last layer
    assert split_budget([1.0, 1.0, 2.0], 10) == [7, 7, 16]
    assert sum(split_budget([0.3, 0.5, 0.7, 1.1], 4000)) == 16000
    with pytest.raises(ValueError):
        split_budget([0.0, 0.0], 10)


def test_top_indices_temporal_order_and_ties_to_newest():
    assert top_indices(torch.tensor([0.9, 0.1, 0.5, 0.8]), 2).tolist() == [0, 3]
    assert top_indices(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2).tolist() == [2, 3]
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]


def test_batched_partition_keeps_the_top_and_evicts_the_rest_in_order():
    """Against a plain-Python ranking (highest score first, the newer token first among
    equal scores): each row's kept tokens and the rest, both in temporal order, after the
    prefix; ties, a constant row, and counts at and past the row's length."""
    from hermes_policy.retention.scoring import batched_partition

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 50, generator=g)
    scores[1, 10:30] = 0.5
    scores[2] = 1.0
    keep, lead = [10, 20, 49, 50, 60], 3
    kept, rest = batched_partition(scores, keep, lead=lead)
    for row, k in enumerate(keep):
        values = scores[row].tolist()
        ranked = sorted(range(50), key=lambda i: (-values[i], -i))
        want = sorted(ranked[:k])
        assert kept[row].tolist() == list(range(lead)) + [i + lead for i in want]
        assert rest[row].tolist() == [i + lead for i in range(50) if i not in want]
        assert torch.equal(top_indices(scores[row], k), torch.tensor(want))


def test_paper_default_with_layer_budgets():
    policy = paper_default(ModelInfo("m", "A", 4, 2, 2, 8), budget=100, budget_weights=[1, 1, 1, 2])
    assert [layer.budget for layer in policy.layers] == [80, 80, 80, 160]


# -- the shared matrix -------------------------------------------------------------------------
def rules(adapter, budget):
    policy = paper_default(ModelInfo.of(adapter), budget=budget)
    return {
        "full": FullRetention(),
        "fifo": FifoRetention(budget=budget),
        "sink+recent": SinkRecentRetention(budget=budget, sink=4),
        "uniform": UniformRetention(budget=budget),
        "attention-only": AttentionRetention(budget=budget),
        "hermes": HermesRetention(policy=policy),
        "hermes-eager": HermesRetention(policy=paper_default(ModelInfo.of(adapter), budget=budget, reindex="eager")),
    }


def frames(adapter, n, seed=0):
    return torch.randint(0, 250, (n, adapter.tokens_per_frame), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["fifo", "sink+recent", "uniform", "attention-only", "hermes", "hermes-eager"])
def test_every_rule_with_a_large_budget_answers_like_full(tiny_adapter, name):
    stream = frames(tiny_adapter, 12, seed=1)
    reference = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=4)
    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 10_000)[name], chunk_frames=4)
    reference.add_frames(stream)
    session.add_frames(stream)
    assert session.compressions == 0
    assert torch.equal(session.next_token_logits("Why?"), reference.next_token_logits("Why?"))
    assert session.ask("Tell me.", max_new_tokens=5).token_ids == reference.ask("Tell me.", max_new_tokens=5).token_ids


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", ["fifo", "sink+recent", "uniform", "attention-only", "hermes", "hermes-eager"])
def test_every_rule_stays_within_budget(tiny_llama_small_limit_dir, name):
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llama_small_limit_dir, device="cpu", tokens_per_frame=4)
    rule = rules(adapter, 48)[name]
    session = StreamingSession(adapter, rule, chunk_frames=8)
    prefix = session.store.lengths()[0]
    prefix_keys = session.store.cache.layers[0].keys.clone()
    stream = frames(adapter, 320, seed=2)  # 1,280 stream tokens: past the 1,024 position limit
    for start in range(0, 320, 40):
        session.add_frames(stream[start : start + 40])
        assert max(session.tokens_kept) <= 48
        for layer in range(adapter.num_layers):
            assert int(session.store.positions[layer].max()) < adapter.max_positions
    assert session.compressions > 0
    assert session.store.prefix_len == prefix  # the system prefix is never evicted ...
    assert torch.equal(session.store.cache.layers[0].keys[..., :prefix, :], prefix_keys)  # ... nor moved
    answer = session.ask("What now?", max_new_tokens=3)
    assert answer.tokens_kept == session.tokens_kept


def test_make_rule_registry(tiny_adapter):
    assert isinstance(make_rule("sink+recent", 64), SinkRecentRetention)
    assert make_rule("uniform", 64).budget == 64
    with pytest.raises(PolicyError, match="needs a policy"):
        make_rule("hermes", 64)


# -- HERMES specifics ---------------------------------------------------------------------------
def test_hermes_policy_for_another_model_is_refused(tiny_adapter):
    other = paper_default(ModelInfo("llava", "Llava", 28, 28, 4, 196), budget=4000)
    with pytest.raises(PolicyError, match="num_layers=28"):
        StreamingSession(tiny_adapter, HermesRetention(policy=other))


def test_hermes_budget_smaller_than_a_frame(tiny_adapter):
    policy = paper_default(ModelInfo.of(tiny_adapter), budget=4)
    with pytest.raises(RetentionError, match="smaller than one frame"):
        StreamingSession(tiny_adapter, HermesRetention(policy=policy))


class Spy:
    """Wrap a rule's select: snapshot every layer as it was when the rule decided."""

    def __init__(self, rule):
        self.calls = []
        original = rule.select

        def select(store, context):
            snapshot = [
                (store.cache.layers[i].keys.clone(), store.cache.layers[i].values.clone(),
                 store.positions[i].clone())
                for i in range(store.num_layers)
            ]
            decision = original(store, context)
            self.calls.append((snapshot, decision))
            return decision

        rule.select = select


def test_summary_token_is_the_mean_of_rerotated_evicted_keys(tiny_adapter):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    policy = paper_default(ModelInfo.of(tiny_adapter), budget=24)
    rule = HermesRetention(policy=policy)
    spy = Spy(rule)
    session = StreamingSession(tiny_adapter, rule, chunk_frames=4)
    session.add_frames(frames(tiny_adapter, 4))  # 32 stream tokens: compress to 23 + summary
    deep = tiny_adapter.num_layers - 1
    assert policy.layers[deep].summary_token
    (snapshot, decision), = spy.calls
    keys, values, positions = snapshot[deep]
    keep = decision[deep]
    prefix = session.store.prefix_len
    evicted = [i for i in range(prefix, keys.shape[-2]) if i not in set(keep.indices.tolist())]
    assert len(evicted) == 32 - 23
    target = keep.summary.position
    assert int(target.max()) == int(positions[:, keep.indices].max()) + 1
    moved = []
    for i in evicted:  # each evicted key moved to the summary position with transformers' RoPE
        cos, sin = tiny_adapter.rotary_emb(keys, target - positions[:, i : i + 1])
        k = keys[..., i : i + 1, :]
        moved.append(apply_rotary_pos_emb(k, k, cos, sin)[1])
    stored = session.store.cache.layers[deep]
    assert session.tokens_kept[deep] == 24
    torch.testing.assert_close(stored.keys[..., -1:, :], torch.stack(moved).mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored.values[..., -1:, :], values[..., evicted, :].mean(-2, keepdim=True))
    assert torch.equal(session.store.positions[deep][:, -1:], target)
    # shallow layers fold nothing
    assert decision[0].summary is None and session.tokens_kept[0] == 24


def test_eager_reindex_keys_equal_keys_computed_at_their_new_positions(tiny_adapter):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    policy = paper_default(ModelInfo.of(tiny_adapter), budget=24, reindex="eager")
    rule = HermesRetention(policy=policy)
    spy = Spy(rule)
    layer = 1
    attention = tiny_adapter.decoder_layers[layer].self_attn
    raw = []

    def record(module, args, output):  # un-rotated keys of chunk prefills
        out = output.view(1, output.shape[1], -1, attention.head_dim).transpose(1, 2)
        blocks = getattr(attention, "hermes_query_blocks", None)
        if blocks is not None:  # pseudo-queries: keep only a chunk riding with them
            out = out[..., : blocks[0], :]
        raw.append(out)

    handle = attention.k_proj.register_forward_hook(record)
    try:
        session = StreamingSession(tiny_adapter, rule, chunk_frames=4)
        session.add_frames(frames(tiny_adapter, 4, seed=5))
    finally:
        handle.remove()
    (_, decision), = spy.calls
    keep = decision[layer].indices
    unrotated = torch.cat(raw, dim=-2)[..., keep, :]
    new_positions = session.store.positions[layer]
    assert torch.equal(new_positions, compact_positions(new_positions, session.store.prefix_len))
    assert int(new_positions.max()) == keep.shape[0] - 1  # compacted
    cos, sin = tiny_adapter.rotary_emb(unrotated, new_positions)
    expected = apply_rotary_pos_emb(unrotated, unrotated, cos, sin)[1]
    torch.testing.assert_close(session.store.cache.layers[layer].keys, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("error")
def test_memory_stays_constant_over_a_long_stream(tiny_llama_small_limit_dir):
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llama_small_limit_dir, device="cpu", tokens_per_frame=2)
    policy = paper_default(ModelInfo.of(adapter), budget=32)
    session = StreamingSession(adapter, HermesRetention(policy=policy), chunk_frames=16, history_limit=4)
    stream = frames(adapter, 1040, seed=6)
    sizes = []
    for start in range(0, 1040, 80):
        session.add_frames(stream[start : start + 80])
        sizes.append(session.store.nbytes())
        assert max(session.tokens_kept) <= 32
        assert max(int(p.max()) for p in session.store.positions) < adapter.max_positions
        session.ask("Anything new?", max_new_tokens=2)
    assert session.frames_seen == 1040 and adapter.max_positions < 1040 * 2
    assert len(set(sizes[1:])) == 1  # flat after the first compression
    assert len(session.history) == 4  # bounded


def test_ask_does_no_retention_work(tiny_adapter, monkeypatch):
    from hermes_policy.attention.capture import AttentionCapture

    policy = paper_default(ModelInfo.of(tiny_adapter), budget=24)
    rule = HermesRetention(policy=policy)
    session = StreamingSession(tiny_adapter, rule, chunk_frames=4)
    session.add_frames(frames(tiny_adapter, 8))
    assert session.compressions > 0 and session.guidance_passes > 0
    counts = {"capture": 0, "select": 0}
    original_record = AttentionCapture.record

    def counting_record(self, *args, **kwargs):
        counts["capture"] += 1
        return original_record(self, *args, **kwargs)

    def counting_select(*args, **kwargs):
        counts["select"] += 1
        raise AssertionError("select must not run at question time")

    monkeypatch.setattr(AttentionCapture, "record", counting_record)
    monkeypatch.setattr(rule, "select", counting_select)
    state = (session.compressions, session.guidance_passes, session.store.lengths())
    session.ask("What happened?", max_new_tokens=4)
    assert counts == {"capture": 0, "select": 0}
    assert (session.compressions, session.guidance_passes, session.store.lengths()) == state


def test_guidance_prompts_use_the_last_question_and_answer(tiny_adapter):
    rule = HermesRetention(policy=paper_default(ModelInfo.of(tiny_adapter), budget=24))
    global_, mixed = rule.prompts([])
    assert global_.startswith("Summarize the video narrative") and mixed.startswith("Describe the current scene")
    global_, mixed = rule.prompts([("Where is the cat?", "On the sofa.")])
    assert global_.startswith("Context summary: Where is the cat? On the sofa.")
    assert mixed.startswith("Find recent details related to: Where is the cat? On the sofa.")
    assert rule.layer_prompt() == (None, 1, 0)  # sensory: none, working: mixed, long-term: global


def test_guidance_prompts_quote_a_long_answer_up_to_history_words(tiny_adapter):
    """A long answer is quoted to its first words (the prompts ride in every compressing
    chunk, the mixed one quoting it twice); a short one whole; None quotes everything."""
    policy = paper_default(ModelInfo.of(tiny_adapter), budget=24)
    answer = " ".join(f"word{i}" for i in range(200))
    turn = [("Where is the cat?", answer)]
    global_, mixed = HermesRetention(policy=policy, history_words=10).prompts(turn)
    quoted = "Where is the cat? word0 word1 word2 word3 word4 word5 ..."
    assert global_.startswith(f"Context summary: {quoted}. Summarize the video narrative")
    assert mixed.startswith(f"Find recent details related to: {quoted}. Describe the current scene")
    assert mixed.count(quoted) == 2 and "word6" not in mixed
    default = HermesRetention(policy=policy)  # 64 words
    assert default.prompts(turn)[0].count("word") == 60 and "word59 ..." in default.prompts(turn)[0]
    assert default.prompts([("Where is the cat?", "On the sofa.")]) == HermesRetention(
        policy=policy, history_words=None
    ).prompts([("Where is the cat?", "On the sofa.")])
    assert "word199" in HermesRetention(policy=policy, history_words=None).prompts(turn)[0]
    with pytest.raises(PolicyError, match="history_words"):
        HermesRetention(policy=policy, history_words=0)


def test_one_guidance_forward_equals_separate_prompt_forwards(tiny_adapter):
    """Prompts batched with a block mask see exactly what each would see alone."""
    from hermes_policy.retention import GuidanceRequest

    session = StreamingSession(tiny_adapter, chunk_frames=4)
    session.add_frames(frames(tiny_adapter, 4, seed=7))
    prompts = ("Summarize everything.", "What is new?")
    both = session.guidance_attention(GuidanceRequest(prompts, (0, 1, 0)))
    alone0 = session.guidance_attention(GuidanceRequest(prompts[:1], (0, None, 0)))
    alone1 = session.guidance_attention(GuidanceRequest(prompts[1:], (None, 0, None)))
    torch.testing.assert_close(both[0], alone0[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both[2], alone0[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both[1], alone1[1], atol=1e-6, rtol=1e-5)
    assert both[0].shape == (session.tokens_kept[0],)
    assert session.store.lengths() == [session.store.prefix_len + 32] * 3  # no trace left


def test_batched_scoring_equals_per_layer_scoring():
    """The whole-tensor path (layers of one length) keeps exactly what the per-layer path keeps."""
    from hermes_policy.cache.kv_store import KVStore
    from hermes_policy.retention.scoring import smooth_across_layers, top_indices

    layers, n, prefix = 6, 300, 5
    info = ModelInfo("x", "y", layers, 4, 2, 10)
    rule = HermesRetention(policy=paper_default(info, budget=120))
    store = KVStore(layers, 1)
    for layer in store.cache.layers:
        layer.set_contents(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4))
    store.positions = [torch.arange(n)[None] for _ in range(layers)]
    store.frame_index = [torch.arange(n) // 10 for _ in range(layers)]
    store.prefix_len = prefix
    g = torch.Generator().manual_seed(0)
    attention = [torch.rand(n - prefix, generator=g) for _ in range(layers)]
    attention[2][10:40] = 0.25  # ties: the newer token wins in both paths
    batched = rule.batched_kept(store, attention)
    raw = rule.layer_scores(store, attention)
    smoothed = smooth_across_layers(raw, [e.smoothing for e in rule.policy.layers])
    with_prefix = rule.batched_kept(store, attention, lead=prefix)
    for layer, entry in enumerate(rule.policy.layers):
        keep = entry.budget - 1 if entry.summary_token else entry.budget
        assert torch.equal(batched[layer], top_indices(smoothed[layer], keep))
        # the prefix's indices ahead, the kept ones shifted past it
        assert torch.equal(with_prefix[layer], torch.cat([torch.arange(prefix), batched[layer] + prefix]))
    store.cache.layers[0].truncate(n - 1)
    store.positions[0] = store.positions[0][:, :-1]
    assert rule.batched_kept(store, attention) is None  # lengths differ: per-layer path


def test_evicted_summary_equals_summary_tokens_of_the_gathered_tokens(tiny_adapter):
    """A layer's summary token straight from its cache (gather, rotation and mean in one
    op) equals summary_tokens of its evicted tokens gathered first."""
    from summary_reference import summary_tokens

    from hermes_policy.cache.positions import rotary_cos_sin
    from hermes_policy.retention.scoring import evicted_summary

    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    positions = torch.arange(30)[None] * 2 + 3
    evicted = torch.tensor([1, 4, 5, 9, 20])
    target = torch.tensor([[70]])
    cos, sin = rotary_cos_sin(tiny_adapter.rotary_emb, target - positions[:, evicted])
    key, value = evicted_summary(keys, values, evicted, cos[0], sin[0])
    want_key, want_value = summary_tokens(
        keys[None, :, :, evicted], values[None, :, :, evicted], positions[None, :, evicted], target[None], tiny_adapter.rotary_emb
    )
    torch.testing.assert_close(key, want_key[0])
    torch.testing.assert_close(value, want_value[0])
    assert not torch.allclose(key, keys[:, :, evicted].mean(-2, keepdim=True)), "the keys were moved"


def test_summary_tokens_of_several_layers_equal_one_layer_at_a_time(tiny_adapter):
    from summary_reference import summary_tokens

    from hermes_policy.cache.positions import rerotate_keys

    g = torch.Generator().manual_seed(3)
    layers, n = 3, 7
    keys = torch.randn(layers, 1, 2, n, 16, generator=g)
    values = torch.randn(layers, 1, 2, n, 16, generator=g)
    positions = torch.stack([torch.randperm(40, generator=g)[:n].sort().values[None] for _ in range(layers)])
    targets = torch.tensor([[[41]], [[45]], [[50]]])
    key, value = summary_tokens(keys, values, positions, targets, tiny_adapter.rotary_emb)
    assert key.shape == value.shape == (layers, 1, 2, 1, 16)
    for layer in range(layers):  # each layer: its evicted keys moved to its target, averaged
        moved = rerotate_keys(keys[layer], positions[layer], targets[layer].expand(-1, n), tiny_adapter.rotary_emb)
        torch.testing.assert_close(key[layer], moved.mean(dim=-2, keepdim=True))
        torch.testing.assert_close(value[layer], values[layer].mean(dim=-2, keepdim=True))


def test_summary_tokens_on_the_per_layer_path_fold_the_kept_tokens_complement(tiny_adapter):
    """Layers of different lengths take the per-layer path, whose summary groups find the
    evicted tokens as the kept ones' complement: each summary layer's token is
    :func:`summary_token` of exactly the tokens it did not keep."""
    from summary_reference import summary_token

    from hermes_policy.cache.kv_store import KVStore
    from hermes_policy.retention import SelectContext

    layers, n, prefix = 6, 300, 5
    rule = HermesRetention(policy=paper_default(ModelInfo("x", "y", layers, 4, 2, 10), budget=120))
    store = KVStore(layers, 1)
    g = torch.Generator().manual_seed(4)
    for i, layer in enumerate(store.cache.layers):
        layer.set_contents(torch.randn(1, 2, n - i, 16, generator=g), torch.randn(1, 2, n - i, 16, generator=g))
    store.positions = [torch.arange(n - i)[None] * 2 for i in range(layers)]
    store.frame_index = [torch.arange(n - i) // 10 for i in range(layers)]
    store.prefix_len = prefix
    attention = [torch.rand(n - i - prefix, generator=g) for i in range(layers)]
    assert rule.batched_kept(store, attention) is None  # lengths differ: the per-layer path
    decisions = rule.select(store, SelectContext(attention=attention, rotary_emb=tiny_adapter.rotary_emb))
    summarised = [layer for layer, keep in decisions.items() if keep.summary is not None]
    assert summarised == [layer for layer, e in enumerate(rule.policy.layers) if e.summary_token]
    for layer in summarised:
        keep, cache = decisions[layer], store.cache.layers[layer]
        kept = set(keep.indices.tolist())
        evicted = torch.tensor([i for i in range(prefix, n - layer) if i not in kept])
        assert len(kept) + len(evicted) == n - layer
        positions = store.positions[layer]
        key, value = summary_token(
            cache.keys[..., evicted, :], cache.values[..., evicted, :], positions[:, evicted], keep.summary.position, tiny_adapter.rotary_emb
        )
        torch.testing.assert_close(keep.summary.key, key, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keep.summary.value, value, atol=1e-6, rtol=1e-6)
        assert int(keep.summary.position.max()) == int(positions[:, keep.indices].max()) + 1


def test_keep_layers_equals_keep_layer_by_layer():
    from hermes_policy.cache.kv_store import KVStore

    def filled() -> KVStore:
        store = KVStore(3, 1)
        for i, layer in enumerate(store.cache.layers):
            layer.set_contents(torch.arange(40.0).view(1, 1, 10, 4) + i, -torch.arange(40.0).view(1, 1, 10, 4))
        store.positions = [torch.arange(10)[None] + i for i in range(3)]
        store.frame_index = [torch.arange(10) // 2 for _ in range(3)]
        return store

    summary = (torch.ones(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.tensor([[99]]), -1)
    decisions = {0: (torch.tensor([0, 3, 4]), None), 2: (torch.tensor([1, 2, 8, 9]), summary)}
    together, one_by_one = filled(), filled()
    together.keep_layers(decisions)
    for layer, (indices, extra) in decisions.items():
        one_by_one.keep(layer, indices, extra)
    for layer in range(3):
        assert torch.equal(together.cache.layers[layer].keys, one_by_one.cache.layers[layer].keys)
        assert torch.equal(together.cache.layers[layer].values, one_by_one.cache.layers[layer].values)
        assert torch.equal(together.positions[layer], one_by_one.positions[layer])
        assert torch.equal(together.frame_index[layer], one_by_one.frame_index[layer])
    assert together.lengths() == [3, 10, 5]
    assert together.positions[2].tolist() == [[3, 4, 10, 11, 99]]


def test_keep_layers_of_alike_layers_equals_keep_layer_by_layer():
    """Layers grouped for the host's bookkeeping (as many tokens held and kept, with or
    without a summary token), three position axes, a layer of another length: positions,
    frames, keys and values as layer by layer."""
    from hermes_policy.cache.kv_store import KVStore

    g = torch.Generator().manual_seed(4)
    lengths = [12, 12, 12, 12, 12, 9]

    def filled() -> KVStore:
        store = KVStore(len(lengths), 3)
        for i, (layer, n) in enumerate(zip(store.cache.layers, lengths, strict=True)):
            tokens = torch.randn(2, 1, 2, n, 4, generator=torch.Generator().manual_seed(i))
            layer.set_contents(tokens[0], tokens[1])
        store.positions = [torch.randint(0, 50, (3, n), generator=torch.Generator().manual_seed(10 + i)) for i, n in enumerate(lengths)]
        store.frame_index = [torch.arange(n) // 3 + i for i, n in enumerate(lengths)]
        return store

    def kept(n: int, count: int) -> torch.Tensor:
        return torch.randperm(n, generator=g)[:count].sort().values

    def summary(i: int) -> tuple:
        return (torch.full((1, 2, 1, 4), float(i)), torch.full((1, 2, 1, 4), -float(i)), torch.tensor([[60 + i], [61], [62]]), -i)

    decisions = {
        0: (kept(12, 6), None),
        1: (kept(12, 6), summary(1)),
        2: (kept(12, 6), None),
        3: (kept(12, 6), summary(3)),
        4: (kept(12, 7), None),
        5: (kept(9, 6), summary(5)),
    }
    together, one_by_one, before = filled(), filled(), filled()
    together.keep_layers(decisions)
    for layer, (indices, extra) in decisions.items():
        one_by_one.keep(layer, indices, extra)
    for layer in range(len(lengths)):
        assert torch.equal(together.cache.layers[layer].keys, one_by_one.cache.layers[layer].keys)
        assert torch.equal(together.cache.layers[layer].values, one_by_one.cache.layers[layer].values)
        assert torch.equal(together.positions[layer], one_by_one.positions[layer])
        assert torch.equal(together.frame_index[layer], one_by_one.frame_index[layer])
        assert together.positions[layer].is_contiguous()
        # against plain indexing of what the layer held
        indices, extra = decisions[layer]
        positions = before.positions[layer][:, indices]
        frames = before.frame_index[layer][indices]
        keys = before.cache.layers[layer].keys[:, :, indices]
        if extra is not None:
            positions = torch.cat([positions, extra[2]], dim=1)
            frames = torch.cat([frames, torch.tensor([extra[3]])])
            keys = torch.cat([keys, extra[0]], dim=2)
        assert torch.equal(together.positions[layer], positions)
        assert torch.equal(together.frame_index[layer], frames)
        assert torch.equal(together.cache.layers[layer].keys, keys)
    assert together.lengths() == [6, 7, 6, 7, 7, 7]
    assert together.positions[3][:, -1].tolist() == [63, 61, 62] and together.frame_index[3][-1] == -3


def test_keep_layers_uses_a_prefetched_copy_of_the_same_tensors_only(monkeypatch):
    """A copy back queued early (prefetch) serves keep_layers when it is of the very tensors
    keep_layers would copy; a stale one (other tensors) is dropped and a new copy made."""
    from hermes_policy.cache import kv_store
    from hermes_policy.cache.kv_store import KVStore

    made = []
    real = kv_store.Download

    def counted(tensors, staging):
        made.append(len(tensors))
        return real(tensors, staging)

    monkeypatch.setattr(kv_store, "Download", counted)

    def filled() -> KVStore:
        store = KVStore(2, 1)
        for layer in store.cache.layers:
            layer.set_contents(torch.arange(40.0).view(1, 1, 10, 4), torch.zeros(1, 1, 10, 4))
        store.positions = [torch.arange(10)[None] for _ in range(2)]
        store.frame_index = [torch.arange(10) for _ in range(2)]
        return store

    indices, position = torch.tensor([0, 4, 5]), torch.tensor([[42]])
    summary = (torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), position, -1)
    decisions = {0: (torch.tensor([1, 2]), None), 1: (indices, summary)}
    used, stale, plain = filled(), filled(), filled()
    used.prefetch([decisions[0][0], indices, position])
    used.keep_layers(decisions)
    assert made == [3], "the prefetched copy served keep_layers"
    stale.prefetch([decisions[0][0], indices.clone(), position])
    stale.keep_layers(decisions)
    assert made == [3, 3, 3], "a copy of other tensors is not used"
    plain.keep_layers(decisions)
    for store in (used, stale):
        assert store._prefetched is None
        for layer in range(2):
            assert torch.equal(store.positions[layer], plain.positions[layer])
            assert torch.equal(store.frame_index[layer], plain.frame_index[layer])
            assert torch.equal(store.cache.layers[layer].keys, plain.cache.layers[layer].keys)
    assert used.positions[1].tolist() == [[0, 4, 5, 42]]


def test_hermes_select_prefetches_what_keep_layers_copies_back(tiny_adapter, monkeypatch):
    """On the batched path HERMES queues the copy back of its indices and summary positions
    before the summary tokens' work, and keep_layers uses that copy (no second one)."""
    from hermes_policy.cache import kv_store
    from hermes_policy.cache.kv_store import KVStore
    from hermes_policy.policy import ModelInfo, paper_default
    from hermes_policy.retention import HermesRetention, SelectContext

    made = []
    real = kv_store.Download
    monkeypatch.setattr(kv_store, "Download", lambda tensors, staging: made.append(len(tensors)) or real(tensors, staging))
    layers, n, prefix = 6, 300, 5
    g = torch.Generator().manual_seed(0)
    store = KVStore(layers, 1)
    for cache_layer in store.cache.layers:
        cache_layer.set_contents(torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g))
    store.positions = [torch.arange(n)[None] * 2 for _ in range(layers)]
    store.frame_index = [torch.arange(n) // 10 for _ in range(layers)]
    store.prefix_len = prefix
    rule = HermesRetention(policy=paper_default(ModelInfo("x", "y", layers, 4, 2, 10), budget=120))
    attention = [torch.rand(n - prefix, generator=g) for _ in range(layers)]
    decisions = rule.select(store, SelectContext(attention=attention, rotary_emb=tiny_adapter.rotary_emb))
    summaries = [k.summary for k in decisions.values() if k.summary is not None]
    assert summaries and made == [len(decisions) + len(summaries)], "queued once, in select"
    store.keep_layers({layer: (k.indices, None if k.summary is None else k.summary.as_extra()) for layer, k in decisions.items()})
    assert made == [len(decisions) + len(summaries)], "keep_layers made no second copy"
    for layer, keep in decisions.items():
        expected = keep.indices.tolist() + ([] if keep.summary is None else [-1])
        positions = store.positions[layer][0].tolist()
        assert positions[: len(keep.indices)] == [2 * i for i in keep.indices.tolist()]
        assert len(positions) == len(expected)
        if keep.summary is not None:
            assert positions[-1] == 2 * int(keep.indices.max()) + 1  # after the last kept token


# -- the host's bookkeeping after a compression, deferred ------------------------------------
@pytest.mark.parametrize("name", ["hermes", "hermes-eager", "fifo", "uniform"])
def test_deferred_bookkeeping_streams_exactly_like_immediate(tiny_llama_small_limit_dir, name, monkeypatch):
    """The same stream (compressions, lazy re-indexing past the position limit, questions in
    between) with the bookkeeping left for the first read of positions and with it done in
    keep_layers: the same positions, frames, keys and values in every layer, the same answers."""
    from hermes_policy.cache.kv_store import KVStore
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llama_small_limit_dir, device="cpu", tokens_per_frame=4)
    stream = frames(adapter, 300, seed=5)
    results = {}
    for defer in (True, False):
        monkeypatch.setattr(KVStore, "defer_bookkeeping", defer)
        session = StreamingSession(adapter, rules(adapter, 48)[name], chunk_frames=8)
        answers = []
        for start in range(0, 300, 60):
            session.add_frames(stream[start : start + 60])
            answers.append(session.ask("What now?", max_new_tokens=3).token_ids)
        assert session.compressions > 0
        store = session.store
        results[defer] = (answers, store.positions, store.frame_index, [layer.keys.clone() for layer in store.cache.layers])
        results[defer] += ([layer.values.clone() for layer in store.cache.layers], store.lengths())
    deferred, immediate = results[True], results[False]
    assert deferred[0] == immediate[0]
    for got, want in zip(deferred[1:5], immediate[1:5], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert deferred[5] == immediate[5]


def test_deferred_bookkeeping_waits_for_the_first_read_of_positions(tiny_adapter):
    """After keep_layers the lengths and next free positions come from what is known
    before the bookkeeping, which runs on the first read of positions or frames (and not
    before), with the values the gathered positions give."""
    from hermes_policy.cache.positions import next_free_position

    session = StreamingSession(tiny_adapter, rules(tiny_adapter, 24)["hermes"], chunk_frames=4)
    session.add_frames(frames(tiny_adapter, 4))
    store = session.store
    assert session.compressions == 1 and store._pending is not None, "the bookkeeping was left for later"
    lengths, ahead = store.lengths(), [store.next_position(layer) for layer in range(store.num_layers)]
    assert store._pending is not None, "lengths and next positions do not need it"
    positions = store.positions  # the first read does it
    assert store._pending is None
    assert [p.shape[1] for p in positions] == lengths
    assert ahead == [next_free_position(p) for p in positions]
    assert [len(f) for f in store.frame_index] == lengths


def test_deferred_bookkeeping_refuses_positions_out_of_order():
    """The next free position known ahead relies on one axis of positions never decreasing
    along a layer's tokens; positions out of order make the bookkeeping fail loudly, and
    positions in order pass."""
    from hermes_policy.cache.kv_store import KVStore

    def store_with(positions: list[int]) -> KVStore:
        store = KVStore(1, 1)
        store.cache.layers[0].set_contents(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4))
        store.positions = [torch.tensor([positions])]
        store.frame_index = [torch.arange(6)]
        return store

    in_order = store_with([0, 1, 2, 3, 4, 5])
    in_order.keep_layers({0: (torch.tensor([0, 4, 5]), None)})
    assert in_order.next_position(0) == 6
    assert in_order.positions[0].tolist() == [[0, 4, 5]]
    shuffled = store_with([0, 1, 9, 3, 4, 5])
    shuffled.keep_layers({0: (torch.tensor([0, 2, 5]), None)})
    assert shuffled.next_position(0) == 6  # known ahead from the last kept token, wrongly
    with pytest.raises(RuntimeError, match="out of order"):
        shuffled.positions  # noqa: B018 - the read runs the bookkeeping


def test_deferred_bookkeeping_refuses_a_reused_staging_buffer():
    """The deferred bookkeeping reads arrays that view the store's staging buffer; were that
    buffer handed out again before the bookkeeping ran (the store's own downloads settle
    first, so only a bug could), it fails loudly instead of using overwritten indices."""
    from hermes_policy.cache.kv_store import KVStore

    store = KVStore(1, 1)
    store.cache.layers[0].set_contents(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4))
    store.positions = [torch.arange(6)[None]]
    store.frame_index = [torch.arange(6)]
    store.keep_layers({0: (torch.tensor([0, 4, 5]), None)})
    store._staging.taken += store._staging.slots - 1  # the other buffer: still fine
    assert store.positions[0].tolist() == [[0, 4, 5]]
    store.keep_layers({0: (torch.tensor([1, 2]), None)})
    store._staging.taken += store._staging.slots  # the bookkeeping's own buffer again
    with pytest.raises(RuntimeError, match="reused staging buffer"):
        store.positions  # noqa: B018 - the read runs the bookkeeping


def test_bookkeeping_is_not_deferred_with_several_position_axes():
    """With multimodal positions (three axes) a layer's next free position needs its kept
    positions gathered: keep_layers does the bookkeeping itself."""
    from hermes_policy.cache.kv_store import KVStore

    store = KVStore(2, 3)
    for i, layer in enumerate(store.cache.layers):
        layer.set_contents(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4) + i)
    store.positions = [torch.arange(18).view(3, 6) for _ in range(2)]
    store.frame_index = [torch.arange(6) for _ in range(2)]
    store.keep_layers({0: (torch.tensor([0, 2, 5]), None), 1: (torch.tensor([1, 3]), None)})
    assert store._pending is None
    assert store.positions[0].tolist() == [[0, 2, 5], [6, 8, 11], [12, 14, 17]]
    assert store.lengths() == [3, 2]
