"""Model adapters: one per architecture behind :class:`ModelAdapter`."""

from hermes_policy.models.base import DEFAULT_SYSTEM_PROMPT, ModelAdapter, StreamPiece
from hermes_policy.models.causal_lm import CausalLMAdapter
from hermes_policy.models.loading import embedded_model_path, load_adapter, use_ragged_attention

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "CausalLMAdapter",
    "ModelAdapter",
    "StreamPiece",
    "embedded_model_path",
    "load_adapter",
    "use_ragged_attention",
]
