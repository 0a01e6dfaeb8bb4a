"""``hermes-heads``: per-KV-head retention driven by a ``hermes-policy/2`` policy (docs/heads.md).

Every KV head of a layer keeps its own tokens, as many as
:func:`~hermes_policy.policy.head_token_budgets` gives it:

- a **streaming** head: the ``sink`` oldest stream tokens the layer holds and its newest
  ones, ``window`` in all;
- a **retrieval** or **anchor** head: its top tokens by the HERMES score with its own
  parameters, ``S = (1 - w_h) minmax(A_l) + w_h minmax(R(k_h))``, where ``A_l`` is the
  layer's pseudo-query attention (the mean over its query heads, as for ``hermes``: the
  capture averages the heads inside the attention kernels) and ``w_h``, ``k_h`` the head's.

The layer's buffer keeps the union of what its heads keep (one gather, as for every rule)
and a head mask saying which of those tokens each KV head may attend
(:class:`~hermes_policy.retention.base.LayerKeep` ``head_mask``;
:mod:`~hermes_policy.attention.head_masks`). A head never sees more than its tokens after a
compression; the tokens of the chunks since are seen by every head until the next one,
which comes as soon as any head would exceed its tokens. The union holds at most the sum of
the heads' tokens, ``num_kv_heads x budget`` (the schema's layer memory), so memory is
bounded and flat; its bytes are the union's times every KV head, which is what masking
costs (docs/heads.md "Runtime").

Not here (docs/heads.md): cross-layer smoothing (scores are per head) and summary tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import PolicyError, RetentionError
from hermes_policy.models.base import ModelAdapter
from hermes_policy.policy import Policy, head_token_budgets
from hermes_policy.retention.base import (
    GuidanceRequest,
    LayerKeep,
    ReindexMode,
    RetentionRule,
    SelectContext,
)
from hermes_policy.retention.hermes_retention import HermesRetention
from hermes_policy.retention.scoring import mix_scores, recency_scores, top_indices


@dataclass
class PerHeadRetention(RetentionRule):
    """Per-KV-head retention of a schema-2 :class:`~hermes_policy.policy.Policy`.

    Parameters
    ----------
    policy : a policy with per-KV-head entries (``hermes-policy/2``)
    sink : oldest stream tokens a streaming head keeps inside its window (at most half of it)
    history_words : as for :class:`~hermes_policy.retention.HermesRetention` (its prompts)
    """

    name = "hermes-heads"
    policy: Policy | None = None
    reindex: ReindexMode = "lazy"
    sink: int = 4
    history_words: int | None = 64

    def __post_init__(self) -> None:
        if self.policy is None or not self.policy.per_head:
            raise PolicyError("the hermes-heads rule needs a hermes-policy/2 policy (per-KV-head entries); "
                              "a hermes-policy/1 policy runs with the hermes rule")
        if self.sink < 0:
            raise PolicyError(f"sink must be >= 0, got {self.sink}")
        self.reindex = self.policy.reindex
        self._prompts = HermesRetention(policy=self.policy, history_words=self.history_words)
        heads = self.policy.model.num_kv_heads
        self._tokens = [head_token_budgets(layer, heads) for layer in self.policy.layers]

    def head_tokens(self, layer: int) -> list[int]:
        """Stream tokens each KV head of ``layer`` keeps (its effective memory)."""
        return self._tokens[layer]

    # -- protocol --------------------------------------------------------------------
    def budget_of(self, layer: int) -> int:
        """The bound on the layer's union: the sum of its heads' tokens."""
        return sum(self._tokens[layer])

    def validate(self, adapter: ModelAdapter) -> None:
        self._prompts.validate(adapter)

    def needs_compression(self, store: KVStore, upcoming: int = 0) -> bool:
        """True when some KV head would see (after ``upcoming`` more tokens) more stream
        tokens than it keeps."""
        return any(self._over(store, layer, upcoming) for layer in range(store.num_layers))

    def _over(self, store: KVStore, layer: int, upcoming: int = 0) -> bool:
        if store.length(layer) - store.prefix_len + upcoming <= min(self._tokens[layer]):
            return False  # (no head can be over: no look at the masks)
        seen = store.visible_stream_tokens(layer)
        return any(n + upcoming > t for n, t in zip(seen, self._tokens[layer], strict=True))

    def layer_prompt(self) -> tuple[int | None, ...]:
        """Per layer: 0 (global prompt) for long-term layers and 1 (mixed) for others where
        a head scores by attention; None where none does."""
        out: list[int | None] = []
        for entry in self.policy.layers:
            scored = any(h.role != "streaming" and h.recency_weight < 1.0 for h in entry.heads)
            out.append((0 if entry.tier == "long_term" else 1) if scored else None)
        return tuple(out)

    def guidance(self, store: KVStore, history: list[tuple[str, str]]) -> GuidanceRequest | None:
        wanted = self.layer_prompt()
        if all(p is None for p in wanted):
            return None
        return GuidanceRequest(prompts=self._prompts.prompts(history), layer_prompt=wanted)

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        """Per layer where a head is over its tokens: the union of the heads' choices and
        the head mask over it."""
        decisions = {}
        for layer in range(store.num_layers):
            if self._over(store, layer):
                attention = None if context.attention is None else context.attention[layer]
                decisions[layer] = self.layer_keep(store, layer, attention)
        return decisions

    def head_choices(self, layer: int, stream: int, attention: torch.Tensor | None) -> torch.Tensor:
        """BoolTensor ``(kv_heads, stream)``: which of the layer's ``stream`` stream tokens
        (oldest first) each KV head keeps."""
        entry = self.policy.layers[layer]
        keep = torch.zeros(len(entry.heads), stream, dtype=torch.bool)
        for head, (policy, tokens) in enumerate(zip(entry.heads, self._tokens[layer], strict=True)):
            if tokens >= stream:
                keep[head] = True
            elif policy.role == "streaming":
                sink = min(self.sink, tokens // 2)
                keep[head, :sink] = True
                keep[head, stream - (tokens - sink) :] = True
            else:
                scored = policy.recency_weight < 1.0
                if scored and attention is None:
                    raise RetentionError(f"layer {layer} head {head} needs pseudo-query attention, none was given")
                recency = recency_scores(stream, policy.forgetting_rate)
                scores = mix_scores(attention.float().cpu() if scored else None, recency, policy.recency_weight)
                keep[head, top_indices(scores, tokens)] = True
        return keep

    def layer_keep(self, store: KVStore, layer: int, attention: torch.Tensor | None) -> LayerKeep:
        """The union of the heads' choices (prefix included) and the head mask over it."""
        prefix = store.prefix_len
        stream = store.length(layer) - prefix
        keep = self.head_choices(layer, stream, attention)
        kept = torch.nonzero(keep.any(dim=0)).flatten()
        indices = torch.cat([torch.arange(prefix), kept + prefix])
        mask = torch.cat([torch.ones(keep.shape[0], prefix, dtype=torch.bool), keep[:, kept]], dim=1)
        return LayerKeep(indices, head_mask=mask)
