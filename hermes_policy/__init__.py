"""hermes_policy: the streaming runtime (models, video input, KV store, retention rules).

The heavy names (the session and the KV store, which import torch and Triton) load on
first use, so that ``hermes-probe --help``, ``version`` and ``show`` answer at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hermes_policy.errors import (
    HermesError,
    ModelLoadError,
    RetentionError,
    StreamError,
    VideoInputError,
)

__version__ = "0.1.0"

# name -> submodule that defines it, imported on first access (PEP 562)
_LAZY = {
    "KVStore": "cache.kv_store",
    "Answer": "session",
    "IngestReport": "session",
    "StreamingSession": "session",
    "RuntimeOptions": "options",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from hermes_policy.cache.kv_store import KVStore
    from hermes_policy.options import RuntimeOptions
    from hermes_policy.session import Answer, IngestReport, StreamingSession


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


__all__ = [
    "Answer",
    "HermesError",
    "IngestReport",
    "KVStore",
    "ModelLoadError",
    "RetentionError",
    "RuntimeOptions",
    "StreamError",
    "StreamingSession",
    "VideoInputError",
]
