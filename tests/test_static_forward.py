"""The answer graphs' fewer-kernel forward against the transformers forward it replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.static import static_masks
from hermes_policy.cache.stream_cache import StaticWrites, StreamCache
from hermes_policy.graphs.answer_graphs import AnswerGraphs
from hermes_policy.graphs.chunk_graphs import batch_axis, per_layer_text_forward
from hermes_policy.graphs.static_forward import (
    fuse_linear_weights,
    signed_sin,
    static_text_forward,
    supports_static_forward,
)
from hermes_policy.kernels.fused_ops import rotate_half_pairs
from hermes_policy.models.random_shapes import build_random_adapter


def test_rotary_in_three_kernels_equals_the_transformers_form():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    angles = torch.randn(1, 5, 8, generator=g) * 3
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    sin_signed = signed_sin(sin)
    torch.testing.assert_close(rotate_half_pairs(q, cos[:, None], sin_signed[:, None]), q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rotate_half_pairs(k, cos[:, None], sin_signed[:, None]), k_ref, rtol=1e-6, atol=1e-6)


def test_fused_linear_weights_are_views_and_compute_the_concatenation():
    g = torch.Generator().manual_seed(1)
    owner = nn.Module()
    layers = [nn.Linear(8, n, bias=True) for n in (6, 2, 2)]
    for layer in layers:
        nn.init.normal_(layer.weight, generator=g)
        nn.init.normal_(layer.bias, generator=g)
    x = torch.randn(3, 8, generator=g)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)
    weight, bias = fuse_linear_weights(layers, owner, "fused")
    torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias), expected)
    torch.testing.assert_close(torch.cat([layer(x) for layer in layers], dim=-1), expected)  # modules unchanged
    assert layers[1].weight.data_ptr() == weight[6:8].data_ptr()  # views, no copy
    assert fuse_linear_weights(layers, owner, "fused")[0] is weight  # reused
    layers[0].weight = nn.Parameter(layers[0].weight.detach().clone())  # e.g. reloaded
    again, _ = fuse_linear_weights(layers, owner, "fused")
    assert again is not weight
    torch.testing.assert_close(torch.nn.functional.linear(x, again, bias), expected)
    with pytest.raises(ValueError, match="bias"):
        fuse_linear_weights([nn.Linear(8, 2), nn.Linear(8, 2, bias=False)], owner, "mixed")


def test_which_models_it_supports(tiny_adapter, tmp_path):
    from tiny_qwen_vl import tiny_qwen3_vl

    from hermes_policy.models import load_adapter

    assert supports_static_forward(tiny_adapter)  # Llama
    assert supports_static_forward(build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32))  # Qwen2
    assert supports_static_forward(build_random_adapter("tiny-qwen2.5-vl", device="cpu", dtype=torch.float32))  # M-RoPE
    # query/key norms and interleaved M-RoPE: not this form
    assert not supports_static_forward(load_adapter(tiny_qwen3_vl(tmp_path / "qwen3"), device="cpu"))

    class QuantisedLinear(nn.Linear):  # stands for bitsandbytes / adapter-wrapped layers
        pass

    adapter = build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32)
    proj = adapter.text_model.layers[1].mlp.up_proj
    adapter.text_model.layers[1].mlp.up_proj = QuantisedLinear(proj.in_features, proj.out_features, bias=False)
    assert not supports_static_forward(adapter)


def filled_cache(adapter, lengths, capacity, seed):
    """A stream cache whose layers hold ``lengths[l]`` random tokens in ``capacity`` slots."""
    g = torch.Generator().manual_seed(seed)
    cache = StreamCache(adapter.num_layers)
    head_dim = adapter.text_config.hidden_size // adapter.num_heads
    for layer, n in zip(cache.layers, lengths, strict=True):
        keys = torch.randn(2, 1, adapter.num_kv_heads, n, head_dim, generator=g).to(adapter.device, adapter.dtype)
        layer.set_contents(keys[0], keys[1])
        layer.reserve(capacity, *layer.buffers)
    return cache


def both_forwards(adapter, q_len: int) -> dict:
    """Hidden states and buffers after the fewer-kernel and the transformers static forward,
    on ragged layers (each at its own length and positions; with M-RoPE, a different
    position on each axis, so every section counts)."""
    layers, device, axes = adapter.num_layers, adapter.device, adapter.position_axes
    lengths = [20 + 3 * layer for layer in range(layers)]
    window, capacity = 64, 96
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (1, q_len), generator=g).to(device)
    slots = (torch.tensor(lengths)[:, None] + torch.arange(q_len)).to(device)
    positions = (torch.tensor(lengths)[:, None] + 7 * torch.arange(layers)[:, None] + torch.arange(q_len))[:, None, :]
    positions = (positions + 5 * torch.arange(axes)[None, :, None]).to(device)  # (layers, axes, q)
    results = {}
    for name in ("transformers", "static"):
        cache = filled_cache(adapter, lengths, capacity, seed=3)
        with torch.inference_mode():
            if name == "static":
                hidden = static_text_forward(adapter, ids, positions, slots, window, cache)
            else:
                axis = batch_axis(adapter.rotary_emb, axes, device, adapter.dtype)
                static = AttentionContext(
                    static_limits=slots, static_blocked=static_masks(slots, window, adapter.attention_modules[0].head_dim)
                )
                with StaticWrites(cache, slots, window):
                    hidden = per_layer_text_forward(adapter, positions, cache, axis, static, input_ids=ids)
        results[name] = (hidden, [layer.buffers for layer in cache.layers])
    return results


def assert_forwards_close(results: dict, tol: float) -> None:
    torch.testing.assert_close(results["static"][0], results["transformers"][0], rtol=tol, atol=tol)
    for (k_s, v_s), (k_t, v_t) in zip(results["static"][1], results["transformers"][1], strict=True):
        torch.testing.assert_close(k_s, k_t, rtol=tol, atol=tol)
        torch.testing.assert_close(v_s, v_t, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-llava-ov", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("combined", [True, False])
def test_static_forward_equals_the_transformers_forward(tiny_adapter, shape, q_len, combined, monkeypatch):
    """Hidden states and written keys and values equal those of the transformers text model
    in the same static mode (keys and values in one buffer, written together, or apart)."""
    from hermes_policy.cache.stream_cache import PreallocatedLayer

    if not combined:
        monkeypatch.setattr(PreallocatedLayer, "kv_buffer", property(lambda self: None))
    adapter = tiny_adapter if shape == "tiny-llama" else build_random_adapter(shape, device="cpu", dtype=torch.float32)
    assert_forwards_close(both_forwards(adapter, q_len), 1e-5)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-llava-ov", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("combined", [True, False])
def test_chunk_forward_equals_the_transformers_forward(tiny_adapter, shape, blocks, combined, monkeypatch):
    """The ingest graphs' fewer-kernel forward: a chunk appended at each layer's own length
    and positions (ragged), with pseudo-query blocks behind it and one layer's attention
    captured, against the transformers text model with per-layer rotary."""
    from hermes_policy.attention.capture import AttentionCapture
    from hermes_policy.cache.stream_cache import PreallocatedLayer
    from hermes_policy.graphs.static_forward import chunk_text_forward

    if not combined:
        monkeypatch.setattr(PreallocatedLayer, "kv_buffer", property(lambda self: None))
    adapter = tiny_adapter if shape == "tiny-llama" else build_random_adapter(shape, device="cpu", dtype=torch.float32)
    layers, axes, q_len = adapter.num_layers, adapter.position_axes, 9
    lengths = tuple(20 + 3 * layer for layer in range(layers))
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(1, q_len, adapter.text_config.hidden_size, generator=g)
    positions = (torch.tensor(lengths)[:, None] + 7 * torch.arange(layers)[:, None] + torch.arange(q_len))[:, None, :]
    positions = positions + 5 * torch.arange(axes)[None, :, None]  # (layers, axes, q)
    results = {}
    for name in ("transformers", "chunk"):
        cache = filled_cache(adapter, lengths, 64, seed=3)
        captured: dict[int, torch.Tensor] = {}
        capture = AttentionCapture(adapter.attention_modules, query_rows={1: slice(6, 8)}, callback=captured.__setitem__)
        attention = AttentionContext(capture=capture, blocks=(4, (2, 3))) if blocks else None
        with torch.inference_mode():
            if name == "chunk":
                hidden = chunk_text_forward(adapter, embeds, positions, cache, lengths, attention=attention)
            else:
                axis = batch_axis(adapter.rotary_emb, axes, adapter.device, adapter.dtype)
                hidden = per_layer_text_forward(adapter, positions, cache, axis, attention, inputs_embeds=embeds)
        assert [layer.length for layer in cache.layers] == [n + q_len for n in lengths]
        results[name] = (hidden, [layer.buffers for layer in cache.layers], captured.get(1))
    assert_forwards_close({"static": results["chunk"][:2], "transformers": results["transformers"][:2]}, 1e-5)
    if blocks:  # the captured rows' probabilities, over the cache and the lead
        assert results["chunk"][2].shape == (1, adapter.num_heads, 2, lengths[1] + 4)
        torch.testing.assert_close(results["chunk"][2], results["transformers"][2], rtol=1e-5, atol=1e-6)


def test_answer_graphs_choose_the_forward_by_model(tiny_adapter, monkeypatch):
    from hermes_policy.cache.kv_store import KVStore

    store = KVStore(tiny_adapter.num_layers, 1)
    assert AnswerGraphs(tiny_adapter, store, use_graphs=False).fewer_kernels
    assert not AnswerGraphs(tiny_adapter, store, use_graphs=False, fewer_kernels=False).fewer_kernels
    qwen = build_random_adapter("tiny-qwen2.5-vl", device="cpu", dtype=torch.float32)
    assert AnswerGraphs(qwen, KVStore(qwen.num_layers, 3), use_graphs=False).fewer_kernels
    monkeypatch.setattr(type(tiny_adapter), "spans_devices", property(lambda self: True))
    assert not AnswerGraphs(tiny_adapter, store, use_graphs=False).fewer_kernels  # a model split over GPUs


def test_biased_attention_equals_masked_attention():
    """The additive-bias form (used on CUDA in half precision) against the boolean mask."""
    from hermes_policy.graphs.static_forward import (
        biased_slot_attention,
        slot_attention,
        stacked_mask_bias,
    )

    g = torch.Generator().manual_seed(4)
    layers, q_len, window, heads, kv_heads, dim = 2, 5, 24, 6, 2, 8
    query = torch.randn(q_len, heads, dim, generator=g)
    keys, values = torch.randn(2, 1, kv_heads, window, dim, generator=g)
    slots = torch.tensor([[9, 10, 11, 12, 13], [3, 4, 5, 6, 7]])
    blocked = torch.arange(window)[None, None, :] > slots[:, :, None]
    bias = stacked_mask_bias(blocked, heads // kv_heads)
    for layer in range(layers):
        expected = slot_attention(query, keys, values, blocked[layer], 0.3)
        torch.testing.assert_close(biased_slot_attention(query, keys, values, bias[layer], 0.3), expected)


def test_rotary_tables_per_axis_are_sectioned_like_the_model():
    """transformers versions whose M-RoPE module returns one table per axis (the attention
    then picks the sections) give the same per-layer tables as those that pick them inside."""
    from types import SimpleNamespace

    from hermes_policy.graphs.static_forward import layer_rotary

    adapter = build_random_adapter("tiny-qwen2.5-vl", device="cpu", dtype=torch.float32)
    rotary = adapter.rotary_emb
    positions = torch.tensor([[[3, 4, 5], [9, 11, 13], [20, 21, 40]], [[1, 2, 3], [1, 2, 3], [1, 2, 3]]])

    def per_axis(x, position_ids):  # (3, batch, q) -> (3, batch, q, head_dim) each
        freqs = position_ids[..., None].float() * rotary.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * rotary.attention_scaling).to(x.dtype), (emb.sin() * rotary.attention_scaling).to(x.dtype)

    stub = SimpleNamespace(rotary_emb=per_axis, dtype=adapter.dtype, text_config=adapter.text_config)
    for got, expected in zip(layer_rotary(stub, positions), layer_rotary(adapter, positions), strict=True):
        assert got.shape == expected.shape == (2, 3, expected.shape[-1])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_a_fused_model_saves_and_reloads_its_weights(tmp_path):
    from transformers import AutoModelForImageTextToText

    from hermes_policy.graphs.static_forward import prepare_static_forward

    adapter = build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32)
    prepare_static_forward(adapter)
    adapter.model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).state_dict()
    saved = adapter.model.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)


@pytest.mark.parametrize(
    "first, captured_last, needed",
    # lead 4, block 0 rows 4-5, block 1 rows 6-8 (9 rows); block 1 captured at layer `first`
    [(1, True, [9, 9, 6]), (1, False, [9, 9, 4]), (0, True, [9, 6, 6]), (0, False, [9, 4, 4])],
)
def test_chunk_forward_without_output_writes_the_same_cache(tiny_adapter, monkeypatch, first, captured_last, needed):
    """Ingest asks for no hidden states: every layer writes the same keys and values for
    the rows still read (the lead always; a pseudo-query block up to the last layer that
    captures it), captured attention is the same, and the last layer runs attention only
    where a capture reads it, and nothing after."""
    from hermes_policy.attention.capture import AttentionCapture
    from hermes_policy.attention.masks import block_rows_needed
    from hermes_policy.graphs import static_forward

    adapter, layers, q_len = tiny_adapter, tiny_adapter.num_layers, 9
    last = layers - 1
    lengths = tuple(20 + 3 * layer for layer in range(layers))
    embeds = torch.randn(1, q_len, adapter.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = (torch.tensor(lengths)[:, None] + torch.arange(q_len))[:, None, :]
    assert layers == 3
    rows = {first: slice(6, 8)} | ({last: slice(4, 6)} if captured_last else {})
    assert block_rows_needed(4, [2, 3], [range(q_len)[rows[i]] if i in rows else range(0) for i in range(layers)]) == needed
    calls, mlp_rows = [], []
    ragged, rest = static_forward.ragged_attention, static_forward._rest_of_layer
    monkeypatch.setattr(static_forward, "ragged_attention", lambda module, *a, **k: calls.append(module) or ragged(module, *a, **k))
    monkeypatch.setattr(static_forward, "_rest_of_layer", lambda layer, h, *a: mlp_rows.append(h.shape[1]) or rest(layer, h, *a))
    results = {}
    for need_output in (True, False):
        cache = filled_cache(adapter, lengths, 64, seed=3)
        captured: dict[int, torch.Tensor] = {}
        calls.clear(), mlp_rows.clear()
        capture = AttentionCapture(adapter.attention_modules, query_rows=rows, callback=captured.__setitem__)
        attention = AttentionContext(capture=capture, blocks=(4, (2, 3)))
        with torch.inference_mode():
            out = static_forward.chunk_text_forward(
                adapter, embeds, positions, cache, lengths, need_output=need_output, attention=attention
            )
        # the caller's context is unchanged (layers that differ get their own copies)
        assert attention.blocks == (4, (2, 3)) and attention.lead_read
        written = [q_len] * layers if need_output else needed
        # output projection and MLP only for the rows the next layer reads
        assert mlp_rows == ([q_len] * layers if need_output else needed[1:])
        assert [layer.length for layer in cache.layers] == [n + w for n, w in zip(lengths, written, strict=True)]
        results[need_output] = ([layer.buffers for layer in cache.layers], captured, len(calls), out)
    (full_buffers, full_captured, full_calls, hidden), (buffers, captured, n_calls, nothing) = results[True], results[False]
    assert hidden.shape == (1, q_len, adapter.text_config.hidden_size) and nothing is None
    assert n_calls == full_calls - (0 if captured_last else 1)
    for layer, (a, b) in enumerate(zip(full_buffers, buffers, strict=True)):
        stop = lengths[layer] + needed[layer]
        torch.testing.assert_close(b[0][..., :stop, :], a[0][..., :stop, :], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b[1][..., :stop, :], a[1][..., :stop, :], atol=1e-6, rtol=1e-5)
    assert full_captured.keys() == captured.keys() == rows.keys()
    for layer in rows:
        torch.testing.assert_close(captured[layer], full_captured[layer], atol=1e-7, rtol=1e-5)


def test_block_rows_needed():
    from hermes_policy.attention.masks import block_rows_needed

    # lead 3, blocks of 2 (rows 3-4) and 4 (rows 5-8)
    assert block_rows_needed(3, [2, 4], [range(0)] * 3) == [3, 3, 3]  # nothing read: the lead only
    assert block_rows_needed(3, [2, 4], [range(5, 7), range(3, 5), range(0)]) == [9, 5, 3]
    assert block_rows_needed(3, [2, 4], [range(3, 5), range(0), range(6, 9)]) == [9, 9, 9]
    assert block_rows_needed(3, [2, 4], [range(0, 2), range(0), range(0)]) == [3, 3, 3]  # lead rows
    assert block_rows_needed(0, [2, 4], [range(0), range(1, 2)]) == [2, 2]
