"""Placeholder until the options branch lands (RuntimeOptions and the environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeOptions:
    blocks_with_chunk: bool = False


def current() -> RuntimeOptions:
    return RuntimeOptions(blocks_with_chunk=os.environ.get("HERMES_BLOCKS_WITH_CHUNK", "0") == "1")
