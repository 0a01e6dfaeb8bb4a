"""Which chunk-attention shapes recur: cuDNN builds an execution plan per shape, worth it
only for shapes a stream meets again and again (a bounded cache's steady state).

:data:`SPLIT_SHAPES` is process-wide, like the plan cache it guards: it counts calls per
shape, so a growing cache (a new shape every chunk) never pays for plans it would use once.
A forward known to recur (a CUDA graph's body) says so in its context
(:attr:`~hermes_policy.attention.context.AttentionContext.steady`) instead.
"""

from __future__ import annotations


class ShapeCounter:
    """How often each attention shape has run; a fused kernel whose first call at a shape
    is expensive (cuDNN builds an execution plan) is used for a shape
    only once it has recurred ``after`` times, so a cache that grows every chunk never pays
    for plans it would use once, and a bounded cache pays once for its steady state."""

    def __init__(self, after: int, limit: int = 4096):
        self.after = after
        self.limit = limit
        self.counts: dict[tuple, int] = {}

    def recurring(self, key: tuple) -> bool:
        """Count one call of shape ``key``; True when it has been seen ``after`` times before."""
        seen = self.counts.get(key, 0)
        if seen < self.after:
            if len(self.counts) >= self.limit:  # a stream of ever-new shapes: forget them
                self.counts.clear()
            self.counts[key] = seen + 1
        return seen >= self.after


# three forwards of a 28-layer model at one shape before cuDNN plans are built for it
SPLIT_SHAPES = ShapeCounter(after=96)
