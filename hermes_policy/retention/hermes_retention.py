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
conversation history both are rewritten with the last question and answer (its first
``history_words`` words: the prompts ride in every compressing chunk, and the mixed prompt
quotes the history twice, so a long answer would cost three times its length in rows of
every chunk for the rest of the stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.cache.positions import rotary_cos_sin
from hermes_policy.cache.transfer import upload
from hermes_policy.errors import PolicyError, RetentionError
from hermes_policy.kernels import summary_kernel
from hermes_policy.models.base import ModelAdapter
from hermes_policy.policy import Policy
from hermes_policy.retention.base import (
    GuidanceRequest,
    LayerKeep,
    ReindexMode,
    RetentionRule,
    SelectContext,
    SummaryToken,
)
from hermes_policy.retention.scoring import (
    batched_partition,
    evicted_summary,
    mix_scores,
    mixed_smoothed_rows,
    recency_scores,
    smooth_across_layers,
    top_indices,
)


@dataclass
class HermesRetention(RetentionRule):
    """The HERMES rule configured by a :class:`~hermes_policy.policy.Policy`.

    ``history_words``: the guidance prompts quote the last question and answer up to this
    many words (whitespace-separated), then "..."; None quotes them whole. 64 words keep a
    question and a sentence-long answer whole (the paper's benchmarks: multiple choice and
    short open answers) and bound what a long answer adds to every compressing chunk.
    """

    name = "hermes"
    policy: Policy | None = None
    reindex: ReindexMode = "lazy"
    history_words: int | None = 64

    def __post_init__(self) -> None:
        if self.policy is None:
            raise PolicyError("the hermes rule needs a policy (a policy.json or paper-default)")
        if self.history_words is not None and self.history_words < 1:
            raise PolicyError(f"history_words must be at least 1 (or None), got {self.history_words}")
        self.reindex = self.policy.reindex
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._zero_rows: dict[tuple[int, torch.device], torch.Tensor] = {}

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
            words = last.split()
            if self.history_words is not None and len(words) > self.history_words:
                last = " ".join(words[: self.history_words]) + " ..."
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
        """Per-layer mixed scores ``S_l`` before smoothing: the scoring path where layers
        differ in length (smoothing then resamples each deeper layer's scores), the
        fallback of :meth:`batched_kept`; tests check both give the same decisions."""
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

    def batched_kept(
        self, store: KVStore, attention: list[torch.Tensor | None] | None, lead: int = 0
    ) -> list[torch.Tensor] | None:
        """Stream indices each layer keeps, scored for all layers at once, where the
        attention lives (no host copy: on a GPU, no wait for it).

        The same decisions as the per-layer path, as a few whole-tensor operations. None
        when layers differ in length (the per-layer path resamples scores between them).
        ``lead``: see :func:`~hermes_policy.retention.scoring.batched_partition` (the
        system prefix ahead of the stream).
        """
        split = self._batched_split(store, attention, lead)
        return None if split is None else split[0]

    def _batched_split(
        self, store: KVStore, attention: list[torch.Tensor | None] | None, lead: int = 0
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """:meth:`batched_kept` and, per layer, the indices it evicts (ascending, shifted by
        ``lead``)."""
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
                attn = self._zeros(n, device)  # ignored: a pure-recency layer
            rows.append(attn.to(device=device, dtype=torch.float32))
        layers = self.policy.layers
        rates, weights = self._layer_parameters(device)
        smoothed = mixed_smoothed_rows(torch.stack(rows), rates, weights, tuple(float(e.smoothing) for e in layers))
        keep = [e.budget - 1 if e.summary_token else e.budget for e in layers]
        return batched_partition(smoothed, keep, lead)

    def _zeros(self, n: int, device: torch.device) -> torch.Tensor:
        """A float32 row of ``n`` zeros on ``device``, made once per length (never written)."""
        key = (n, device)
        cached = self._zero_rows.get(key)
        if cached is None:
            if len(self._zero_rows) >= 4:  # the lengths of a stream before its steady state
                self._zero_rows.clear()
            cached = self._zero_rows[key] = torch.zeros(n, device=device)
        return cached

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
        """Kept indices per layer over budget, with summary tokens where the policy asks.

        On the batched path (all layers of one length) indices and summary positions stay
        where the scores were computed (the GPU in a session): nothing here waits for it;
        :meth:`KVStore.keep_layers` reads them back once, after queueing the gathers.
        """
        prefix = store.prefix_len
        # on the batched path each row holds the prefix's indices, then the kept ones; the
        # evicted ones come with them (a summary token folds them)
        split = self._batched_split(store, context.attention, lead=prefix)
        if split is None:
            attention = context.attention
            if attention is not None:  # per-layer scoring is cheaper on the host
                attention = [None if a is None else a.cpu() for a in attention]
            raw = self.layer_scores(store, attention)
            smoothed = smooth_across_layers(raw, [entry.smoothing for entry in self.policy.layers])
        lengths = store.stream_lengths()
        indices: dict[int, torch.Tensor] = {}  # prefix included
        evicted: dict[int, torch.Tensor] = {}  # where known already (the batched path)
        for layer, entry in enumerate(self.policy.layers):
            if lengths[layer] <= entry.budget:
                continue
            if split is not None:
                indices[layer], evicted[layer] = split[0][layer], split[1][layer]
            else:
                keep_count = entry.budget - 1 if entry.summary_token else entry.budget
                kept = top_indices(smoothed[layer], keep_count).cpu() + prefix
                indices[layer] = torch.cat([torch.arange(prefix), kept])
        with torch.profiler.record_function("hermes:summary"):
            summarised = [layer for layer in indices if self.policy.layers[layer].summary_token]
            groups = self._summary_groups(
                store, {layer: indices[layer][prefix:] for layer in summarised}, evicted, context
            )
            if split is not None:  # on the device: the copy back is queued before the summaries' work
                targets = {layer: group.positions[i] for group in groups for i, layer in enumerate(group.layers)}
                store.prefetch(list(indices.values()) + [targets[layer] for layer in indices if layer in targets])
            summaries = self._summaries(store, groups, context)
        return {layer: LayerKeep(kept, summaries.get(layer)) for layer, kept in indices.items()}

    def _summary_groups(
        self,
        store: KVStore,
        kept_by_layer: dict[int, torch.Tensor],
        evicted_by_layer: dict[int, torch.Tensor],
        context: SelectContext,
    ) -> list[_SummaryGroup]:
        """The layers in ``kept_by_layer`` (sorted kept indices, prefix excluded) grouped by
        length and number of evicted tokens, with their evicted indices and positions and
        their summary tokens' positions, where their indices live (no host copy: the
        positions travel there). A layer's evicted indices come from ``evicted_by_layer``
        (ascending) where given; otherwise they are its kept ones' complement."""
        if not kept_by_layer:
            return []
        if context.rotary_emb is None:
            raise RetentionError("summary tokens need the model's rotary module")
        grouped: dict[tuple[int, int, torch.device], list[tuple[int, torch.Tensor]]] = {}
        for layer, kept in kept_by_layer.items():
            length = store.length(layer)
            evicted = length - store.prefix_len - kept.shape[0]
            grouped.setdefault((length, evicted, kept.device), []).append((layer, kept))
        groups = []
        for (length, _, device), members in grouped.items():
            kept = torch.stack([k for _, k in members])  # (m, k)
            layers = [layer for layer, _ in members]
            if all(layer in evicted_by_layer for layer in layers):
                evicted = torch.stack([evicted_by_layer[layer] for layer in layers])
            else:  # the complement of the kept stream tokens, ascending
                keep_mask = torch.zeros(len(members), length - store.prefix_len, dtype=torch.bool, device=device)
                keep_mask.scatter_(1, kept - store.prefix_len, True)
                evicted = torch.stack([torch.nonzero(~row).flatten() for row in keep_mask]) + store.prefix_len
            # positions live on the host: one copy of this group's (no wait for the GPU)
            host_positions = np.stack([store.positions[layer].numpy() for layer in layers])  # (m, axes, length)
            positions = upload(torch.from_numpy(host_positions), device)
            axes = positions.shape[1]
            evicted_positions = positions.gather(2, evicted[:, None, :].expand(-1, axes, -1))
            kept_positions = positions.gather(2, kept[:, None, :].expand(-1, axes, -1))
            targets = (kept_positions.amax(dim=(1, 2)) + 1)[:, None, None].expand(-1, axes, 1)
            groups.append(_SummaryGroup(layers, evicted, evicted_positions, targets, list(targets.unbind(0))))
        return groups

    def _summaries(self, store: KVStore, groups: list[_SummaryGroup], context: SelectContext) -> dict[int, SummaryToken]:
        """One summary token per layer of ``groups``: the rotations of each group at once,
        then every layer's evicted tokens gathered, moved and averaged by one kernel for
        the group (:mod:`~hermes_policy.kernels.summary_kernel`), or by one fused op a layer where
        that kernel does not run."""
        out: dict[int, SummaryToken] = {}
        for group in groups:
            layers, axes, n = group.evicted_positions.shape
            delta = group.targets.expand(-1, -1, n) - group.evicted_positions  # (m, axes, n)
            cos, sin = rotary_cos_sin(context.rotary_emb, delta.permute(1, 0, 2).reshape(axes, layers * n), group.evicted.device)
            cos, sin = cos.view(layers, n, -1), sin.view(layers, n, -1)
            caches = [store.cache.layers[layer] for layer in group.layers]
            together = summary_kernel.evicted_summaries(
                [c.keys for c in caches], [c.values for c in caches], group.evicted, cos, sin
            )
            for i, (layer, cache_layer) in enumerate(zip(group.layers, caches, strict=True)):
                if together is not None:
                    key, value = together[0][i], together[1][i]
                else:
                    key, value = evicted_summary(cache_layer.keys, cache_layer.values, group.evicted[i], cos[i], sin[i])
                    key = key.contiguous()
                out[layer] = SummaryToken(key=key, value=value, position=group.positions[i], frame=-1)
        return out


@dataclass
class _SummaryGroup:
    """Layers whose summary tokens are computed together (one length, as many evicted)."""

    layers: list[int]
    evicted: torch.Tensor  # (m, evicted) indices into each layer's tokens, ascending
    evicted_positions: torch.Tensor  # (m, axes, evicted)
    targets: torch.Tensor  # (m, axes, 1): the summary tokens' positions
    positions: list[torch.Tensor]  # per layer, its row of targets (the objects handed on)
