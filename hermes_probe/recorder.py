"""Record how each layer and head attends over the cached stream, one probe query at a time.

The recorder uses the runtime's attention capture (the same mechanism the HERMES rule's
pseudo-queries use): while a probe question is prefilled on top of the cache, each layer
hands over the softmax probabilities of the question's tokens, computed from that layer's
own query states, whatever attention implementation the model uses for ordinary prefill.
Only running sums are kept (:class:`~hermes_probe.profiles.AttentionProfile`).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from hermes_policy.attention.capture import AttentionCapture
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.models.base import ModelAdapter
from hermes_policy.session import StreamingSession

from .profiles import AttentionProfile

TOP_FRACTION = 0.01


def frame_runs(frame_index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Runs of consecutive tokens of the same frame: ``(start, length, frame)`` each.

    Tokens with frame index -1 (text, separators) end a run and belong to none.
    """
    runs, start = [], None
    values = frame_index.tolist()
    for i, frame in enumerate([*values, None]):
        if start is not None and (frame != values[start]):
            runs.append((start, i - start, values[start]))
            start = None
        if start is None and frame is not None and frame >= 0:
            start = i
    return runs


def frame_period(frame_index: torch.Tensor) -> int:
    """Tokens per frame as seen in the cache: the most common run length (complete runs)."""
    runs = frame_runs(frame_index)
    lengths = [length for _, length, _ in runs[1:]] or [length for _, length, _ in runs]
    if not lengths:
        raise ValueError("the cache holds no frame tokens")
    return Counter(lengths).most_common(1)[0][0]


def frame_phases(frame_index: torch.Tensor, period: int) -> torch.Tensor:
    """Offset of each token within its frame ``(seq,)``; -1 for tokens of no frame.

    The oldest run may have lost its first tokens to eviction: its tokens are counted from
    the frame's end, so offsets stay the offsets the tokens had when their frame arrived.
    """
    phases = torch.full_like(frame_index, -1)
    for k, (start, length, _) in enumerate(frame_runs(frame_index)):
        shift = period - length if (k == 0 and length < period) else 0
        phases[start : start + length] = torch.arange(length) + shift
    phases[phases >= period] = -1
    return phases


class AttentionRecorder:
    """Accumulate attention profiles over probe queries.

    Parameters
    ----------
    adapter : the model adapter
    max_distance : longest distance recorded (the probe's FIFO window)
    period : tokens per frame; measured from the cache at the first probe when None
    """

    def __init__(self, adapter: ModelAdapter, max_distance: int, period: int | None = None):
        self.adapter = adapter
        self.max_distance = max_distance
        self.period = period
        self.profile: AttentionProfile | None = None
        self._layout: list[tuple[int, int, torch.Tensor]] = []

    def _ensure_profile(self, store: KVStore) -> AttentionProfile:
        if self.profile is None:
            stream = store.frame_index[0][store.prefix_len :]
            period = self.period or frame_period(stream)
            self.profile = AttentionProfile(
                self.adapter.num_layers, self.adapter.num_heads, self.max_distance, period
            )
        return self.profile

    def probe(self, session: StreamingSession, question: str) -> None:
        """Prefill ``question`` on the session's cache and record every layer's attention."""
        session.flush()
        store = session.store
        profile = self._ensure_profile(store)
        self._layout = []
        for layer in range(store.num_layers):
            stream_frames = store.frame_index[layer][store.prefix_len :]
            self._layout.append(
                (store.prefix_len, stream_frames.shape[0], frame_phases(stream_frames, profile.period))
            )
        capture = AttentionCapture(self.adapter.attention_modules, callback=self._record)
        session.run_query(question, capture=capture)
        profile.probes += 1

    def _record(self, layer: int, probs: torch.Tensor) -> None:
        """probs: ``(1, heads, query_tokens, keys)`` float32."""
        profile = self.profile
        prefix, length, phases = self._layout[layer]
        if length == 0:
            return
        stream = probs[0, :, :, prefix : prefix + length].double()  # (H, q, T)
        mass = stream.sum(-1)  # (H, q)
        attn = (stream / mass.clamp_min(1e-300)[..., None]).mean(1)  # (H, T), sums to 1
        reach = min(length, profile.max_distance)
        by_distance = attn.flip(-1)[:, :reach].cpu().numpy()
        profile.distance_sum[layer, :, :reach] += by_distance
        profile.distance_count[layer, :reach] += 1

        valid = phases >= 0
        if bool(valid.any()):
            idx = phases[valid].to(attn.device)
            summed = torch.zeros(attn.shape[0], profile.period, dtype=attn.dtype, device=attn.device)
            summed.index_add_(1, idx, attn[:, valid.to(attn.device)])
            profile.phase_sum[layer] += summed.cpu().numpy()
            profile.phase_count[layer] += np.bincount(phases[valid].numpy(), minlength=profile.period)

        if length > 1:
            entropy = -(attn * attn.clamp_min(1e-300).log()).sum(-1) / math.log(length)
            profile.entropy_sum[layer] += entropy.cpu().numpy()
        top = max(1, math.ceil(TOP_FRACTION * length))
        profile.top_mass_sum[layer] += attn.topk(top, dim=-1).values.sum(-1).cpu().numpy()
        profile.video_mass_sum[layer] += mass.mean(-1).cpu().numpy()
