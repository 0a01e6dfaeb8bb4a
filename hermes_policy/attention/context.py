"""What one forward's attention needs besides its queries, keys and values.

transformers hands the keyword arguments of a model's forward down to the attention
function of every layer; an :class:`AttentionContext` travels that way, under the keyword
:data:`ATTENTION_KWARG`::

    adapter.forward(piece, positions, cache, attention=AttentionContext(capture=capture))
    # = model(..., attention_context=context) -> every layer's ragged_attention(..., attention_context=context)

No state is set on the model's modules: a forward without a context is plain bottom-right
causal attention over each layer's own cache, whatever ran before it. A context is built
per forward (or once for a CUDA graph's body, whose replays reuse its tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from hermes_policy.attention.capture import AttentionCapture

ATTENTION_KWARG = "attention_context"


@dataclass(frozen=True)
class AttentionContext:
    """Per-forward inputs of the attention function (see the module docstring).

    Parameters
    ----------
    capture : hand the probabilities of chosen rows to this capture
    blocks : ``(lead, sizes)``: the new tokens are ``lead`` ordinary (causal) tokens, then
        independent query blocks of these sizes, each seeing the cache, the lead and,
        causally, itself only (:func:`~hermes_policy.attention.masks.block_query_mask`)
    lead_read : False when no later step reads the lead's attention output (the last layer
        of an ingest forward whose blocks alone are captured): only the blocks are computed
    static_limits : static mode (fixed-shape answers): LongTensor ``(layers, q)``, the
        highest slot of the layer's whole buffer each new token may see
    static_blocked : static mode's mask ``(layers, q, window)``, True where a token may
        not look, when built for all layers at once (None: from the limits, per layer)
    steady : the forward's shapes recur (a CUDA graph's body): chunk attention takes the
        kernels of a stream's steady state from the first run
        (:data:`~hermes_policy.attention.shapes.SPLIT_SHAPES`)
    head_masks : per layer, BoolTensor ``(kv_heads, width)``: which of the layer's first
        ``width`` cached tokens each KV head may attend (per-head retention; later tokens
        are visible to every head), or None where every head sees every token; None for
        none at all. A masked layer runs :mod:`~hermes_policy.attention.head_masks`'
        explicit path
    """

    capture: AttentionCapture | None = None
    blocks: tuple[int, tuple[int, ...]] | None = None
    lead_read: bool = True
    static_limits: torch.Tensor | None = None
    static_blocked: torch.Tensor | None = None
    steady: bool = False
    head_masks: tuple[torch.Tensor | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.blocks is not None:
            lead, sizes = self.blocks
            object.__setattr__(self, "blocks", (int(lead), tuple(int(s) for s in sizes)))

    def head_mask(self, layer: int) -> torch.Tensor | None:
        """The head mask of ``layer`` (None: every head sees every token)."""
        return None if self.head_masks is None else self.head_masks[layer]

    def with_changes(self, **changes: Any) -> AttentionContext:
        """A copy with some fields replaced (a layer of a hand-written forward that differs)."""
        return replace(self, **changes)

    def graph_key(self, num_layers: int, q_len: int) -> tuple:
        """What, besides the tokens' count and the cache lengths, shapes a forward under this
        context (a CUDA graph's key): the block layout and the rows captured at each layer."""
        captured = ()
        if self.capture is not None:
            rows = (self.capture.rows(layer, q_len) for layer in range(num_layers))
            captured = tuple((layer, r.start, r.stop) for layer, r in enumerate(rows) if len(r))
        return (self.blocks, self.lead_read, captured, self.steady)


def attention_kwargs(context: AttentionContext | None) -> dict[str, Any]:
    """The keyword arguments that carry ``context`` through a model's forward (none for None)."""
    return {} if context is None else {ATTENTION_KWARG: context}
