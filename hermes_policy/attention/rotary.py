"""Each decoder layer's own rotary embedding for one transformers forward."""

from __future__ import annotations

import torch
from torch import nn


class PerLayerRotary:
    """Give each decoder layer its own rotary cos/sin for one forward.

    The model computes ``position_embeddings`` once from ``position_ids`` and shares them
    across layers; layers whose caches were compacted differently need the new tokens at
    different positions. A forward pre-hook swaps in each layer's own ``(cos, sin)``.

    Parameters
    ----------
    decoder_layers : the text model's decoder layers
    embeddings : per layer ``(cos, sin)`` as returned by the model's rotary module
    """

    def __init__(self, decoder_layers: list[nn.Module], embeddings: list[tuple[torch.Tensor, torch.Tensor]]):
        self._handles = []
        self._layers = decoder_layers
        self._embeddings = embeddings

    def __enter__(self) -> PerLayerRotary:
        for layer, emb in zip(self._layers, self._embeddings, strict=True):

            def hook(module: nn.Module, args: tuple, kwargs: dict, emb=emb) -> tuple[tuple, dict]:
                kwargs["position_embeddings"] = emb
                return args, kwargs

            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
