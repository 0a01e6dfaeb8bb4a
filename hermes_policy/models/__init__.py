"""Model adapters: one per architecture behind :class:`ModelAdapter`."""

from .base import DEFAULT_SYSTEM_PROMPT, ModelAdapter, StreamPiece
from .causal_lm import CausalLMAdapter
from .loading import embedded_model_path, load_adapter, use_ragged_attention

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "CausalLMAdapter",
    "ModelAdapter",
    "StreamPiece",
    "embedded_model_path",
    "load_adapter",
    "use_ragged_attention",
]
