"""``hermes``: hierarchical KV retention driven by a policy (METHOD.md sections 3-7).

Per compression step and per layer ``l`` (stream tokens only; the system prefix is never
evicted):

1. scores: recency ``R = exp(-k_l dt / (T - 1))``; attention ``A`` = the pseudo-query's
   attention at layer ``l`` itself; ``S_l = (1 - w_l) minmax(A) + w_l minmax(R)``
   (layers with ``w_l = 1`` need no attention);
2. cross-layer smoothing from deep to shallow with ``lambda_l`` (resampling where lengths
   differ);
3. each layer over its budget keeps its top tokens by smoothed score, in temporal order;
   layers with ``summary_token`` keep one slot for a token folding everything evicted.

The pseudo-queries are the policy's guidance prompts: long-term layers use the global
prompt, other attention-using layers the mixed prompt (local + "; " + global); with a
conversation history both are rewritten with the last question and answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PolicyError, RetentionError
from ..kv_store import KVStore
from ..models.base import ModelAdapter
from ..policy import Policy
from ..transfer import upload
from .base import (
    GuidanceRequest,
    LayerKeep,
    ReindexMode,
    RetentionRule,
    SelectContext,
    SummaryToken,
)
from .scoring import (
    batched_mixed_scores,
    batched_top_indices,
    mix_scores,
    recency_scores,
    smooth_across_layers,
    summary_tokens,
    top_indices,
)


@dataclass
class HermesRetention(RetentionRule):
    """The HERMES rule configured by a :class:`~hermes_policy.policy.Policy`."""

    name = "hermes"
    policy: Policy | None = None
    reindex: ReindexMode = "lazy"

    def __post_init__(self) -> None:
        if self.policy is None:
            raise PolicyError("the hermes rule needs a policy (a policy.json or paper-default)")
        self.reindex = self.policy.reindex
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- protocol --------------------------------------------------------------------
    def budget_of(self, layer: int) -> int:
        return self.policy.layers[layer].budget

    def validate(self, adapter: ModelAdapter) -> None:
        tokens_per_frame = adapter.tokens_per_frame
        self.policy.check_model(adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, tokens_per_frame)
        small = [entry.index for entry in self.policy.layers if entry.budget < tokens_per_frame]
        if small:
            raise RetentionError(
                f"policy budgets of layers {small} are smaller than one frame ({tokens_per_frame} tokens)"
            )

    def prompts(self, history: list[tuple[str, str]]) -> tuple[str, str]:
        """(global prompt, mixed prompt), rewritten with the last Q/A when there is one."""
        g = self.policy.guidance
        if history:
            question, answer = history[-1]
            last = f"{question} {answer}".strip()
            local = g.local_with_history.format(history=last)
            global_ = g.global_with_history.format(history=last)
        else:
            local, global_ = g.local, g.global_
        return global_, f"{local}; {global_}"

    def layer_prompt(self) -> tuple[int | None, ...]:
        """0 (global) for long-term layers, 1 (mixed) for other layers using attention."""
        out: list[int | None] = []
        for entry in self.policy.layers:
            if entry.recency_weight >= 1.0:
                out.append(None)
            else:
                out.append(0 if entry.tier == "long_term" else 1)
        return tuple(out)

    def guidance(self, store: KVStore, history: list[tuple[str, str]]) -> GuidanceRequest | None:
        wanted = self.layer_prompt()
        if all(p is None for p in wanted):
            return None
        return GuidanceRequest(prompts=self.prompts(history), layer_prompt=wanted)

    def layer_scores(self, store: KVStore, attention: list[torch.Tensor | None] | None) -> list[torch.Tensor]:
        """Per-layer mixed scores ``S_l`` before smoothing."""
        scores = []
        lengths = store.stream_lengths()
        # scored where the attention is, all layers on one device (smoothing mixes them)
        given = [a for a in attention or [] if a is not None]
        device = given[0].device if given else torch.device("cpu")
        for layer, entry in enumerate(self.policy.layers):
            attn = attention[layer] if attention is not None else None
            recency = recency_scores(lengths[layer], entry.forgetting_rate, device)
            if attn is None and entry.recency_weight < 1.0:
                raise RetentionError(f"layer {layer} needs pseudo-query attention, none was given")
            scores.append(mix_scores(attn, recency, entry.recency_weight))
        return scores

    def batched_kept(self, store: KVStore, attention: list[torch.Tensor | None] | None) -> list[torch.Tensor] | None:
        """Stream indices each layer keeps (CPU), scored for all layers at once.

        The same decisions as the per-layer path, as a few whole-tensor operations and one
        host copy (on a GPU: no sync per layer). None when layers differ in length (the
        per-layer path resamples scores between them).
        """
        lengths = store.stream_lengths()
        if len(set(lengths)) != 1:
            return None
        n = lengths[0]
        given = [a for a in attention or [] if a is not None]
        device = given[0].device if given else torch.device("cpu")
        rows = []
        for layer, entry in enumerate(self.policy.layers):
            attn = attention[layer] if attention is not None else None
            if attn is None:
                if entry.recency_weight < 1.0:
                    raise RetentionError(f"layer {layer} needs pseudo-query attention, none was given")
                attn = torch.zeros(n, device=device)
            rows.append(attn.to(device=device, dtype=torch.float32))
        layers = self.policy.layers
        rates, weights = self._layer_parameters(device)
        scores = batched_mixed_scores(torch.stack(rows), rates, weights)
        smoothed = torch.stack(smooth_across_layers(list(scores), [e.smoothing for e in layers]))
        keep = [e.budget - 1 if e.summary_token else e.budget for e in layers]
        return batched_top_indices(smoothed, keep)

    def _layer_parameters(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Forgetting rates and recency weights ``(layers,)`` on ``device`` (copied once)."""
        cached = self._on_device.get(device)
        if cached is None:
            layers = self.policy.layers
            cached = self._on_device[device] = (
                upload(torch.tensor([e.forgetting_rate for e in layers]), device),
                upload(torch.tensor([e.recency_weight for e in layers]), device),
            )
        return cached

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        batched = self.batched_kept(store, context.attention)
        if batched is None:
            attention = context.attention
            if attention is not None:  # per-layer scoring is cheaper on the host
                attention = [None if a is None else a.cpu() for a in attention]
            raw = self.layer_scores(store, attention)
            smoothed = smooth_across_layers(raw, [entry.smoothing for entry in self.policy.layers])
        prefix = store.prefix_len
        lengths = store.stream_lengths()
        kept_by_layer: dict[int, torch.Tensor] = {}
        for layer, entry in enumerate(self.policy.layers):
            if lengths[layer] <= entry.budget:
                continue
            keep_count = entry.budget - 1 if entry.summary_token else entry.budget
            if batched is not None:
                kept_by_layer[layer] = batched[layer] + prefix
            else:
                kept_by_layer[layer] = top_indices(smoothed[layer], keep_count).cpu() + prefix
        with torch.profiler.record_function("hermes:summary"):
            summaries = self._summaries(
                store, {layer: kept for layer, kept in kept_by_layer.items() if self.policy.layers[layer].summary_token}, context
            )
        head = torch.arange(prefix)
        return {
            layer: LayerKeep(torch.cat([head, kept]), summaries.get(layer)) for layer, kept in kept_by_layer.items()
        }

    def _summaries(
        self, store: KVStore, kept_by_layer: dict[int, torch.Tensor], context: SelectContext
    ) -> dict[int, SummaryToken]:
        """One summary token per layer in ``kept_by_layer`` (kept indices on the host),
        computed together for layers with as many evicted tokens on one device."""
        if not kept_by_layer:
            return {}
        if context.rotary_emb is None:
            raise RetentionError("summary tokens need the model's rotary module")
        groups: dict[tuple[int, torch.device], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for layer, kept in kept_by_layer.items():
            state = store.layer(layer)
            # index bookkeeping in numpy: torch's CPU indexing cost ~1 ms a layer on a
            # 16-core GPU host (its thread pool), numpy's a few microseconds
            kept_np = kept.numpy()
            positions = state.positions.numpy()
            evicted = np.ones(state.length, dtype=bool)
            evicted[: state.prefix_len] = False
            evicted[kept_np] = False
            idx = torch.from_numpy(np.flatnonzero(evicted))
            # positions live on the host: the summary's position costs no GPU sync
            target = torch.full((positions.shape[0], 1), int(positions[:, kept_np].max()) + 1)
            groups.setdefault((len(idx), state.keys.device), []).append((layer, idx, target))
        out: dict[int, SummaryToken] = {}
        for (_, device), members in groups.items():
            indices = upload(torch.stack([idx for _, idx, _ in members]), device)
            states = [store.layer(layer) for layer, _, _ in members]
            keys = torch.stack([st.keys.index_select(-2, indices[i]) for i, st in enumerate(states)])
            values = torch.stack([st.values.index_select(-2, indices[i]) for i, st in enumerate(states)])
            positions = torch.from_numpy(
                np.stack([st.positions.numpy()[:, idx.numpy()] for st, (_, idx, _) in zip(states, members, strict=True)])
            )
            targets = torch.stack([target for _, _, target in members])
            key, value = summary_tokens(keys, values, positions, targets, context.rotary_emb)
            for i, (layer, _, target) in enumerate(members):
                out[layer] = SummaryToken(key=key[i], value=value[i], position=target, frame=-1)
        return out
