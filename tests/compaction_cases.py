"""Eviction decisions for the compaction kernel's tests (CPU under the interpreter, CUDA),
and the reference they are checked against: each layer gathered on its own."""

from __future__ import annotations

import torch

from hermes_policy.cache.stream_cache import PreallocatedLayer
from hermes_policy.kernels import compaction_kernel


def layer_with(tokens: torch.Tensor) -> PreallocatedLayer:
    """A layer holding ``tokens`` ``(2, batch, heads, n, dim)`` as keys and values."""
    layer = PreallocatedLayer()
    layer.set_contents(tokens[0], tokens[1])
    return layer


def decisions(device: str, dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, object]]:
    """Per layer ``(tokens, kept indices, summary or None)``: layers of different lengths,
    a prefix always kept, some evicting a few tokens (every source just ahead of its
    destination: the in-place hazard), some most of them, one keeping all, one keeping
    the last token only, summary tokens on some."""
    g = torch.Generator().manual_seed(seed)
    out = []
    cases = [  # (length, kept, summary)
        (150, "all but 3", True),
        (97, "a third", False),
        (200, "all", False),
        (64, "last", True),
        (130, "a third", True),
    ]
    for length, how, summary in cases:
        tokens = torch.randn(2, 1, 3, length, 16, generator=g).to(dtype)
        prefix = 5
        if how == "all":
            kept = torch.arange(length)
        elif how == "last":
            kept = torch.cat([torch.arange(prefix), torch.tensor([length - 1])])
        else:
            count = length - prefix - 3 if how == "all but 3" else (length - prefix) // 3
            stream = torch.randperm(length - prefix, generator=g)[:count].sort().values + prefix
            kept = torch.cat([torch.arange(prefix), stream])
        extra = None
        if summary:
            extra = tuple(torch.randn(1, 3, 1, 16, generator=g).to(dtype).to(device) for _ in range(2))
        out.append((tokens.to(device), kept.to(device), extra))
    return out


def check_compaction(device: str, dtype: torch.dtype, **launch: int) -> None:
    """The kernel against each layer gathered by :meth:`PreallocatedLayer.gather`, bit for
    bit (``launch``: its tile of rows and of words)."""
    cases = decisions(device, dtype)
    expected = [layer_with(tokens) for tokens, _, _ in cases]
    for layer, (_, kept, extra) in zip(expected, cases, strict=True):
        layer.gather(kept, extra)
    layers = [layer_with(tokens) for tokens, _, _ in cases]
    done = compaction_kernel.compact_layers_kernel(
        [layer.kv_buffer for layer in layers], [kept for _, kept, _ in cases], [extra for _, _, extra in cases], **launch
    )
    assert done
    for layer, want, (_, kept, extra) in zip(layers, expected, cases, strict=True):
        layer.length = kept.shape[0] + (extra is not None)
        assert torch.equal(layer.keys, want.keys) and torch.equal(layer.values, want.values)
