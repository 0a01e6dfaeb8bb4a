"""Bad input gives one clear error, of the package's own error types."""

from __future__ import annotations

import pytest
import torch

from hermes_policy import ModelLoadError, RetentionError, StreamError, StreamingSession
from hermes_policy.models import load_adapter
from hermes_policy.retention import FifoRetention, make_rule


def test_question_before_any_frame(tiny_adapter):
    session = StreamingSession(tiny_adapter)
    with pytest.raises(StreamError, match="before any frame"):
        session.ask("What do you see?")
    with pytest.raises(StreamError, match="before any frame"):
        session.next_token_logits("What do you see?")


def test_empty_question(tiny_adapter):
    session = StreamingSession(tiny_adapter, chunk_frames=1)
    session.add_frames(["a frame"])
    with pytest.raises(StreamError, match="empty"):
        session.ask("   ")


def test_budget_smaller_than_a_frame(tiny_adapter):
    with pytest.raises(RetentionError, match="smaller than one frame"):
        StreamingSession(tiny_adapter, FifoRetention(budget=tiny_adapter.tokens_per_frame - 1))


def test_unknown_rule():
    with pytest.raises(RetentionError, match="unknown retention rule 'lru'"):
        make_rule("lru")


def test_bad_chunk_size(tiny_adapter):
    with pytest.raises(StreamError, match="chunk_frames"):
        StreamingSession(tiny_adapter, chunk_frames=0)


def test_text_frames_of_the_wrong_shape(tiny_adapter):
    session = StreamingSession(tiny_adapter, chunk_frames=1)
    with pytest.raises(StreamError, match="shape"):
        session.add_frames(torch.zeros(2, tiny_adapter.tokens_per_frame + 1, dtype=torch.long))


def test_timestamps_must_match_frames(tiny_adapter):
    session = StreamingSession(tiny_adapter, chunk_frames=1)
    with pytest.raises(StreamError, match="timestamps"):
        session.add_frames(["a", "b"], timestamps=[0.0])


def test_unsupported_model_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported model type 'gpt2'"):
        load_adapter(tmp_path, device="cpu")


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_adapter(tmp_path / "nope", device="cpu")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_adapter(tmp_path / "model.gguf", device="cpu")


def test_folder_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load a model config"):
        load_adapter(tmp_path, device="cpu")
