"""Shared fixtures: tiny models built in code, and the embedded SmolLM2 (loaded once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_llama  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def restore_runtime_options():
    """Each test leaves the process's runtime options as it found them (a session, or a test
    comparing kernels, applies its options process-wide)."""
    from hermes_policy import options

    previous = options.current()
    yield
    options.apply(previous)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_small_limit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose position limit (1024) a long stream would pass without re-indexing."""
    return tiny_llama(tmp_path_factory.mktemp("tiny_llama_1k"), layers=3, max_positions=1024)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama_dir: Path):
    from hermes_policy.models import load_adapter

    return load_adapter(tiny_llama_dir, device="cpu", tokens_per_frame=8)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (real weights, ~20 s to load on 2 cores)."""
    from hermes_policy.models import load_adapter

    return load_adapter(None, device="cpu", tokens_per_frame=24)
