"""The recorder against a reference eager attention, profile storage, and resumable runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hermes_policy import StreamingSession
from hermes_probe.profiles import AttentionProfile, ProfileError
from hermes_probe.recorder import AttentionRecorder
from hermes_probe.runner import ProbeConfig, ProbeError, analyze, record_streams, stream_budget
from hermes_probe.sources import ProbeStream


def id_frames(adapter, n, seed=0):
    return torch.randint(0, 250, (n, adapter.tokens_per_frame), generator=torch.Generator().manual_seed(seed))


def test_recorder_equals_eager_attention(tiny_adapter):
    """Per layer and head, the recorded distance profile equals one computed by hand from
    transformers' eager attention weights of the same one-shot sequence."""
    frames = id_frames(tiny_adapter, 6)
    session = StreamingSession(tiny_adapter, chunk_frames=3)
    session.add_frames(frames)
    recorder = AttentionRecorder(tiny_adapter, max_distance=64)
    recorder.probe(session, "What is here?")
    profile = recorder.profile
    assert profile.probes == 1 and profile.period == tiny_adapter.tokens_per_frame

    prefix = tiny_adapter.prefix_piece(session.system_prompt).input_ids
    question = tiny_adapter.question_piece("What is here?").input_ids
    ids = torch.cat([prefix, frames.reshape(-1), question])[None]
    model = tiny_adapter.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attentions = model(input_ids=ids, output_attentions=True).attentions
    finally:
        from hermes_policy.models import use_ragged_attention

        use_ragged_attention(model)
    p, t, q = len(prefix), frames.numel(), len(question)
    for layer, weights in enumerate(attentions):
        stream = weights[0, :, -q:, p : p + t].double()  # (H, q, T)
        attn = (stream / stream.sum(-1, keepdim=True)).mean(1)
        expected = attn.flip(-1).numpy()
        np.testing.assert_allclose(profile.distance_sum[layer, :, :t], expected, atol=1e-5)
        phase = attn.reshape(attn.shape[0], -1, tiny_adapter.tokens_per_frame).sum(1).numpy()
        np.testing.assert_allclose(profile.phase_sum[layer], phase, atol=1e-5)
        np.testing.assert_allclose(profile.video_mass_sum[layer], stream.sum(-1).mean(-1).numpy(), atol=1e-5)
    assert (profile.distance_count[:, :t] == 1).all() and (profile.distance_count[:, t:] == 0).all()


def test_profile_save_load_merge_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    a = AttentionProfile(3, 2, 10, 4, probes=2, meta={"done": ["x"]})
    a.distance_sum[:] = rng.random(a.distance_sum.shape)
    a.phase_count[:] = 3
    path = a.save(tmp_path / "p.npz")
    b = AttentionProfile.load(path)
    assert b.meta == {"done": ["x"]} and b.probes == 2
    np.testing.assert_array_equal(a.distance_sum, b.distance_sum)
    longer = AttentionProfile(3, 2, 16, 4, probes=1)
    longer.distance_sum[:] = 1.0
    b.merge(longer)
    assert b.max_distance == 16 and b.probes == 3
    np.testing.assert_allclose(b.distance_sum[..., :10], a.distance_sum + 1.0)
    with pytest.raises(ProfileError, match="different models"):
        b.merge(AttentionProfile(4, 2, 10, 4))


def test_profile_files_are_not_unpickled(tmp_path):
    bad = tmp_path / "evil.npz"
    np.savez(bad, header=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ProfileError, match="not a hermes-probe profile"):
        AttentionProfile.load(bad)
    with pytest.raises(ProfileError, match="not found"):
        AttentionProfile.load(tmp_path / "missing.npz")


def test_stream_budget_scales_down_for_short_streams():
    config = ProbeConfig(fifo_budget=6000)
    assert stream_budget(config, 1000, 196) == 6000
    assert stream_budget(config, 40, 48) == 30 * 48
    assert stream_budget(config, 2, 48) == 48


def _streams(adapter, names, calls):
    def make(name, seed):
        def load():
            calls.append(name)
            return id_frames(adapter, 12, seed), np.arange(12, dtype=np.float64)
        return ProbeStream(name, load)
    return [make(name, i) for i, name in enumerate(names)]


def test_interrupted_runs_resume_without_redoing_streams(tiny_adapter, tmp_path):
    config = ProbeConfig(chunk_frames=4, fifo_budget=48)
    calls: list[str] = []
    names = ["a", "b", "c"]
    uninterrupted, _ = record_streams(tiny_adapter, _streams(tiny_adapter, names, calls),
                                      config, tmp_path / "full.npz", progress=False)
    # first run stops after two streams (as if interrupted), the rerun does the third only
    calls.clear()
    record_streams(tiny_adapter, _streams(tiny_adapter, names[:2], calls), config,
                   tmp_path / "part.npz", progress=False)
    resumed, _ = record_streams(tiny_adapter, _streams(tiny_adapter, names, calls), config,
                                tmp_path / "part.npz", progress=False)
    assert calls == ["a", "b", "c"]
    assert [s["name"] for s in resumed.meta["streams"]] == names and resumed.probes == uninterrupted.probes
    assert len(resumed.meta["done"]) == len(names)
    np.testing.assert_allclose(resumed.distance_sum, uninterrupted.distance_sum, atol=1e-12)
    # another protocol on the same file is refused
    with pytest.raises(ProbeError, match="another model or protocol"):
        record_streams(tiny_adapter, _streams(tiny_adapter, names, calls),
                       ProbeConfig(chunk_frames=2, fifo_budget=48), tmp_path / "part.npz", progress=False)


def test_analyze_refuses_to_overwrite_a_policy(tiny_adapter, tmp_path):
    config = ProbeConfig(chunk_frames=4, fifo_budget=48)
    streams = _streams(tiny_adapter, ["a"], [])
    analyze(tiny_adapter, streams, config, tmp_path, progress=False, figures=False, policy_budget=64)
    before = (tmp_path / "policy.json").read_bytes()
    with pytest.raises(ProbeError, match="already holds a policy"):
        analyze(tiny_adapter, streams, config, tmp_path, progress=False, figures=False)
    assert (tmp_path / "policy.json").read_bytes() == before


def test_unreadable_streams_are_reported_and_skipped(tiny_adapter, tmp_path):
    from hermes_policy.errors import VideoInputError

    def broken():
        raise VideoInputError("cannot decode broken.mp4")

    streams = [ProbeStream("broken.mp4", broken), *_streams(tiny_adapter, ["ok"], [])]
    result = analyze(tiny_adapter, streams, ProbeConfig(chunk_frames=4, fifo_budget=48), tmp_path,
                     progress=False, figures=False, policy_budget=64)
    assert result.failed == {"broken.mp4": "cannot decode broken.mp4"}
    assert [s["name"] for s in result.profile.meta["streams"]] == ["ok"]
    with pytest.raises(ProbeError, match="no stream could be probed"):
        analyze(tiny_adapter, [ProbeStream("broken.mp4", broken)], ProbeConfig(), tmp_path / "x",
                progress=False, figures=False)
