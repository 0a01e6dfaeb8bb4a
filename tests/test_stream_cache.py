"""The preallocated stream cache: appends, growth, gathers and static-slot writes."""

from __future__ import annotations

import pytest
import torch

from hermes_policy.cache.stream_cache import (
    GROWTH_QUANTUM,
    PreallocatedLayer,
    StaticWrites,
    StreamCache,
    as_words,
    grown_capacity,
)


def kv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)


def test_grown_capacity_is_amortised_and_aligned():
    assert grown_capacity(0, 10) == GROWTH_QUANTUM
    assert grown_capacity(256, 257) == 512  # 1.5x = 384, rounded up to the quantum
    assert grown_capacity(1024, 1025) == 1536
    assert grown_capacity(256, 5000) == 5120
    assert all(grown_capacity(c, n) % GROWTH_QUANTUM == 0 for c in (0, 256, 768) for n in (1, 300, 999))


def test_appends_equal_concatenation_and_grow_in_place_until_full():
    layer = PreallocatedLayer()
    parts = [kv(n, seed) for seed, n in enumerate((100, 120, 50, 300))]
    generations = []
    for k, v in parts:
        keys, values = layer.update(k, v)
        generations.append(layer.generation)
    torch.testing.assert_close(layer.keys, torch.cat([k for k, _ in parts], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(layer.values, torch.cat([v for _, v in parts], dim=-2), rtol=0, atol=0)
    assert keys.shape[-2] == layer.get_seq_length() == 570
    assert generations == [1, 1, 2, 3]  # 256 holds 220; 270 grows to 512; 570 to 768
    assert layer.capacity == 768


def test_truncate_gather_and_summary_append():
    layer = PreallocatedLayer()
    k, v = kv(40)
    layer.update(k, v)
    layer.truncate(30)
    assert layer.get_seq_length() == 30
    with pytest.raises(ValueError):
        layer.truncate(31)
    idx = torch.tensor([0, 1, 5, 29])
    extra = kv(1, seed=9)
    layer.gather(idx, extra)
    expected_k = torch.cat([k[..., idx, :], extra[0]], dim=-2)
    torch.testing.assert_close(layer.keys, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(layer.values, torch.cat([v[..., idx, :], extra[1]], dim=-2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, head_dim, words", [(torch.bfloat16, 128, True), (torch.float32, 6, True), (torch.bfloat16, 6, False)])
def test_gather_moves_rows_as_words_bit_for_bit(dtype, head_dim, words):
    """Rows move as 8-byte words where their bytes allow: the same bits, fewer elements."""
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 2, 50, head_dim, generator=g).to(dtype) for _ in range(2))
    buffer = torch.zeros(1, 2, 64, head_dim, dtype=dtype)
    viewed = as_words(buffer)
    assert (viewed.dtype == torch.int64) == words and viewed.data_ptr() == buffer.data_ptr()
    layer = PreallocatedLayer()
    layer.update(k, v)
    idx = torch.tensor([0, 3, 4, 17, 49])
    layer.gather(idx)
    assert torch.equal(layer.keys, k[..., idx, :]) and torch.equal(layer.values, v[..., idx, :])


def test_views_are_read_only_attributes():
    layer = PreallocatedLayer()
    layer.update(*kv(3))
    with pytest.raises(AttributeError, match="set_contents"):
        layer.keys = torch.zeros(1, 2, 3, 4)
    layer.set_contents(*kv(5, seed=2))
    assert layer.get_seq_length() == 5


def test_static_writes_go_to_slots_and_return_the_whole_buffer():
    cache = StreamCache(2)
    for layer in cache.layers:
        layer.update(*kv(10))
    before = [layer.keys.clone() for layer in cache.layers]
    slots = torch.tensor([[10, 11], [12, 13]])  # layer 1 writes two slots further on
    new_k, new_v = kv(2, seed=3)
    with StaticWrites(cache, slots):
        keys, _ = cache.update(new_k, new_v, 1)
    assert keys.shape[-2] == cache.layers[1].capacity  # the whole buffer
    assert cache.layers[1].get_seq_length() == 10  # nothing counted
    torch.testing.assert_close(keys[..., 12:14, :], new_k, rtol=0, atol=0)
    torch.testing.assert_close(cache.layers[1].keys, before[1], rtol=0, atol=0)
    assert all(layer.static_slots is None for layer in cache.layers)


def test_fresh_buffers_are_zero_not_garbage():
    layer = PreallocatedLayer()
    layer.update(*kv(3))
    k, v = layer.buffers
    assert torch.count_nonzero(k[..., 3:, :]) == 0 and torch.count_nonzero(v[..., 3:, :]) == 0


def test_next_positions_follow_every_change_of_the_store():
    """The cached next free position is recomputed whenever a layer's positions change."""
    from hermes_policy.cache.kv_store import KVStore

    store = KVStore(2, 1)
    k = torch.randn(1, 2, 5, 4)
    for layer in store.cache.layers:
        layer.update(k, k)
    store.record_appended([torch.arange(5)[None], torch.arange(10, 15)[None]], torch.zeros(5, dtype=torch.long))
    assert [store.next_position(layer) for layer in range(2)] == [5, 15]
    assert store.next_position(0) == 5  # from the cache
    store.truncate([3, 5])
    assert [store.next_position(layer) for layer in range(2)] == [3, 15]
    store.keep_layers({1: (torch.tensor([0, 1]), None)})
    assert [store.next_position(layer) for layer in range(2)] == [3, 12]
