"""Tiny random models of every supported architecture, built in code (no network).

Each builder returns a folder holding a saved model plus tokenizer/processor, so tests go
through the same ``from_pretrained`` path users do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hermes_policy.models.offline_tokenizer import CHATML, SPECIAL_TOKENS, byte_tokenizer  # noqa: F401


def vocab_size(tokenizer) -> int:
    return len(tokenizer)


def tiny_llama(folder: Path, layers: int = 3, max_positions: int = 4096, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
