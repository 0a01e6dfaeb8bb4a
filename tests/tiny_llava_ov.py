"""A tiny random LLaVA-OneVision (Qwen2 text model + SigLIP vision tower), built in code.

The folder it writes holds the model, the byte-level test tokenizer and a real
``LlavaOnevisionProcessor`` (image + video processor at the tiny resolution, and a chat
template with structured content in the layout of the released LLaVA-OV-Qwen2
checkpoints), so ``hermes_policy.models.load_adapter(folder)`` loads it through
``AutoProcessor`` + ``AutoModelForImageTextToText`` exactly as it would a hub model.

Frame size: ``image_size // patch_size = 5`` patches a side, pooled to ``ceil(5 / 2) = 3``,
so 9 tokens per frame (odd on purpose, like the real 27 -> 14, to exercise the ceil).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hermes_policy.models.offline_tokenizer import LLAVA_OV_CHAT_TEMPLATE

try:  # tests/ is on sys.path under pytest (conftest.py); the repository root otherwise
    from tiny_models import byte_tokenizer
except ImportError:  # pragma: no cover
    from tests.tiny_models import byte_tokenizer

IMAGE_SIZE = 70
PATCH_SIZE = 14

def tiny_llava_onevision(
    folder: Path,
    layers: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Build, save and return a folder with a tiny random LLaVA-OneVision model.

    Parameters
    ----------
    folder : where to save (created if missing)
    layers : decoder layers of the Qwen2 text model
    max_positions : the text model's ``max_position_embeddings``
    seed : torch seed for the random weights
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    video_token_id = tokenizer.convert_tokens_to_ids("<video>")

    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
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
        initializer_range=0.1,  # larger than the default so attention is far from uniform
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
        initializer_range=0.1,
    )
    config = LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[
            [IMAGE_SIZE, IMAGE_SIZE],
            [IMAGE_SIZE, 2 * IMAGE_SIZE],
            [2 * IMAGE_SIZE, IMAGE_SIZE],
        ],
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.save_pretrained(folder)

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=config.image_grid_pinpoints
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder
