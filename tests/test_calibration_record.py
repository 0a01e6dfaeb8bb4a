"""Recording a calibration stream on a tiny model: shapes, normalisation, value norms."""

from __future__ import annotations

import numpy as np
import torch

from hermes_policy.inputs.fidelity_tasks import fidelity_stream
from hermes_policy.retention import FullRetention
from hermes_policy.session import StreamingSession
from hermes_probe.calibrate import record_stream, value_output_norms


def test_record_stream_on_a_tiny_model(tiny_adapter):
    stream = fidelity_stream(8, 0, tiny_adapter.frame_ids, tiny_adapter.encode_text, kv_facts=2, copy_probes=2)
    record = record_stream(tiny_adapter, stream, chunk_frames=4)
    layers, heads = tiny_adapter.num_layers, tiny_adapter.num_heads
    length = 8 * tiny_adapter.tokens_per_frame
    assert record.questions.shape == (len(stream.probes), layers, heads, length)
    assert np.allclose(record.questions.sum(-1), 1.0, atol=1e-4)
    assert np.allclose(record.weighted.sum(-1), 1.0, atol=1e-4)
    assert [s.shape for s in record.guidance["global"]] == [(layers, length // 2), (layers, length)]
    assert record.target(0, "value").shape == (len(stream.probes), length)


def test_value_output_norms_equal_a_direct_computation(tiny_adapter):
    session = StreamingSession(tiny_adapter, FullRetention(), chunk_frames=2)
    session.add_frames(["one two three four", "five six seven eight"])
    norms = value_output_norms(tiny_adapter, session)
    prefix = session.store.prefix_len
    layer, head = 1, tiny_adapter.num_heads - 1
    values = session.store.layer(layer).values[0, :, prefix:].float()
    group = tiny_adapter.num_heads // values.shape[0]
    dim = values.shape[-1]
    weight = tiny_adapter.attention_modules[layer].o_proj.weight.detach().float()
    for token in (0, values.shape[1] - 1):
        full = torch.zeros(tiny_adapter.num_heads * dim)
        full[head * dim : (head + 1) * dim] = values[head // group, token]
        expected = float((weight @ full).norm())
        assert abs(norms[layer, head, token] - expected) < 1e-4 * max(1.0, expected)
