"""Admitting streams (hermes_policy/serving/admission.py): the KV bound holds the real
buffers, running streams count at their real size, and a full device refuses with a reason."""

from __future__ import annotations

import random
from types import SimpleNamespace

import httpx
import pytest
import torch
from test_serve import running

from hermes_policy import StreamingSession
from hermes_policy.cache.stream_cache import grown_capacity
from hermes_policy.policy import ModelInfo, paper_default
from hermes_policy.retention import FifoRetention, HermesRetention
from hermes_policy.serving import admission
from hermes_policy.serving.admission import StreamRegistry, capacity_bound, kv_bound_bytes


def test_capacity_bound_is_the_most_any_growth_ends_with():
    rng = random.Random(0)
    for _ in range(300):
        capacity, needs = 0, sorted(rng.sample(range(1, 6000), rng.randint(1, 12)))
        for needed in needs:  # a buffer grows whenever a larger need comes
            if needed > capacity:
                capacity = grown_capacity(capacity, needed)
        assert needs[-1] <= capacity <= capacity_bound(needs[-1])
    for needed in (1, 255, 256, 257, 5588):  # reached: growing from one slot short
        assert grown_capacity(needed - 1, needed) == capacity_bound(needed)


@pytest.mark.parametrize("chunk", [1, 64])  # 64 frames of 8 tokens: the chunk outgrows prefix + budget
def test_the_bound_holds_what_a_bounded_session_allocates(tiny_adapter, chunk):
    """Streamed past its budget and asked for the longest answer the bound allows, a fifo
    session's buffers stay within kv_bound_bytes (a full-cache rule has no bound)."""
    session = StreamingSession(tiny_adapter, FifoRetention(budget=96), chunk_frames=chunk, max_new_tokens=40)
    bound = kv_bound_bytes(session, 40)
    session.add_frames(torch.randint(0, 250, (140, 8), generator=torch.Generator().manual_seed(chunk)))
    session.ask("Where was the last thing seen in the stream, and what came just before it?")
    assert session.compressions > 0 and 0 < session.store.cache.allocated_bytes() <= bound
    assert kv_bound_bytes(StreamingSession(tiny_adapter, chunk_frames=chunk), 40) is None


def fake_stream(bound: int, allocated: int, **settings) -> SimpleNamespace:
    cache = SimpleNamespace(allocated_bytes=lambda: allocated)
    return SimpleNamespace(description={"kv_bound_bytes": bound, "policy": "p", "budget": 96, "chunk_frames": 8,
                                        **settings},
                           session=SimpleNamespace(store=SimpleNamespace(cache=cache)))


def test_running_streams_count_at_their_real_buffers_when_larger():
    """A rule's extra tokens (pseudo-queries) can grow buffers past the bound: the registry
    counts them, and bounds a new stream of the same settings by them."""
    registry = StreamRegistry(max_streams=4, kv_budget_bytes=1000)
    registry.streams = {"a": fake_stream(100, 300), "b": fake_stream(200, 50, chunk_frames=1)}
    assert registry.held_bytes() == 300 + 200
    assert registry.bound_for(100, {"policy": "p", "budget": 96, "chunk_frames": 8}) == 300
    assert registry.bound_for(100, {"policy": "p", "budget": 96, "chunk_frames": 4}) == 100
    assert registry.admit(500) is None
    assert "are taken" in registry.admit(501)  # 500 held + 501 > 1000
    assert "device has" in registry.admit(400, free_bytes=399)
    assert registry.admit(400, free_bytes=400) is None


def test_hermes_session_past_its_bound_is_counted_at_its_buffers(tiny_adapter):
    """With the HERMES rule the real buffers are what the registry counts when larger."""
    rule = HermesRetention(policy=paper_default(ModelInfo.of(tiny_adapter), budget=96))
    session = StreamingSession(tiny_adapter, rule, chunk_frames=8, max_new_tokens=8)
    session.add_frames(torch.randint(0, 250, (40, 8), generator=torch.Generator().manual_seed(4)))
    stream = SimpleNamespace(description={"kv_bound_bytes": 1}, session=session)
    assert StreamRegistry.counted_bytes(stream) == session.store.cache.allocated_bytes() > 1


def test_a_device_without_room_refuses_the_stream_with_a_reason(tiny_adapter, monkeypatch):
    monkeypatch.setattr("hermes_policy.serving.app.device_free_bytes", lambda device: 1024)
    with running(tiny_adapter) as (base, _):
        refused = httpx.post(base + "/v1/streams", json={"source": "synthetic"})
        assert refused.status_code == 503 and "the device has 0 MiB free" in refused.json()["error"]["message"]
    assert admission.device_free_bytes(torch.device("cpu")) is None
