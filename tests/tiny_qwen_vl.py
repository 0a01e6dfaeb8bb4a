"""Tiny random Qwen2.5-VL and Qwen3-VL models, built in code (no network).

Each builder saves a model, its tokenizer (the byte-level tokenizer of ``tests.tiny_models``)
and the model's real processor classes (image processor, video processor, processor with a
Qwen-VL style chat template) into a folder, so tests load them through
``hermes_policy.models.load_adapter`` -> ``AutoProcessor`` / ``AutoModelForImageTextToText``.

Frame geometry: frames of ``FRAME_HEIGHT x FRAME_WIDTH`` (64 x 96) pixels. The processors'
min/max pixel budgets pin the resized frame so every chunk has the same grid:

- Qwen2.5-VL: patch 14, merge 2 -> frames resized to 56 x 84 -> grid (4, 6) patches per
  temporal patch -> 2 x 3 = 6 LLM tokens per temporal patch of 2 frames.
- Qwen3-VL: patch 16, merge 2 -> frames kept at 64 x 96 -> grid (4, 6) -> 6 LLM tokens per
  temporal patch; DeepStack features taken after both vision blocks.

The grid is deliberately not square (2 x 3 merged tokens), so the h and w axes differ.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hermes_policy.models.offline_tokenizer import QWEN_VL_CHAT_TEMPLATE, qwen_vl_token_ids

try:
    from tiny_models import byte_tokenizer, vocab_size
except ImportError:  # imported as tests.tiny_qwen_vl
    from tests.tiny_models import byte_tokenizer, vocab_size

FRAME_HEIGHT = 64
FRAME_WIDTH = 96

def _text_config(
    tokenizer, layers: int, max_positions: int, mrope_section: list[int], **extra
) -> dict:
    return dict(
        vocab_size=vocab_size(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section,
        },
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **extra,
    )


def tiny_qwen2_5_vl(
    folder: Path,
    layers: int = 3,
    max_positions: int = 1024,
    tokens_per_second: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny Qwen2.5-VL (sectioned M-RoPE, window-attention vision tower), saved to ``folder``.

    ``tokens_per_second`` sets the temporal position step: ``tokens_per_second * 2 / fps`` per
    temporal patch (4 at 1 fps), larger than the merged grid's ``max(h, w) = 3`` so a 4-frame
    chunk exhibits transformers issue 45381.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, layers, max_positions, [2, 3, 3]),  # head_dim 16
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            out_hidden_size=64,
            tokens_per_second=tokens_per_second,
        ),
        tie_word_embeddings=False,
        **qwen_vl_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    pixels = 56 * 84
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=size, patch_size=14, merge_size=2, temporal_patch_size=2
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(
            size=size,
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            cap_pixels_per_frame=False,
        ),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_qwen3_vl(folder: Path, layers: int = 3, max_positions: int = 1024, seed: int = 0) -> Path:
    """A tiny Qwen3-VL (interleaved M-RoPE, DeepStack after vision blocks 0 and 1), saved to ``folder``."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    config = Qwen3VLConfig(
        text_config=_text_config(tokenizer, layers, max_positions, [4, 2, 2], head_dim=16),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        ),
        tie_word_embeddings=False,
        **qwen_vl_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    # Qwen3-VL's budget is for the whole clip (t x h x w): generous enough that a 64 x 96
    # frame is never downscaled for chunks of up to 32 frames.
    size = {"shortest_edge": 32 * 32, "longest_edge": 32 * FRAME_HEIGHT * FRAME_WIDTH}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 32 * 32, "longest_edge": FRAME_HEIGHT * FRAME_WIDTH},
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(
            size=size,
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            fps=2,
            cap_pixels_per_frame=False,
        ),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
