"""hermes_policy: the streaming runtime (models, video input, KV store, retention rules)."""

from .errors import HermesError, ModelLoadError, RetentionError, StreamError, VideoInputError
from .kv_store import KVStore
from .session import Answer, IngestReport, StreamingSession

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "HermesError",
    "IngestReport",
    "KVStore",
    "ModelLoadError",
    "RetentionError",
    "StreamError",
    "StreamingSession",
    "VideoInputError",
]
