"""Tokenizers and chat templates that need no download.

:func:`byte_tokenizer` is a byte-level BPE without merges with ChatML and vision special
tokens: every byte is one token, so any text round-trips. Used where the token *values*
do not matter, only that the chat format and special tokens exist: the tiny test models
and random-weight models. English text takes about five times as many tokens as with a
real BPE, which matters where the *number* of tokens does (the efficiency benchmark's
questions and pseudo-queries): :func:`with_chat_tokens` turns any real BPE tokenizer
(the embedded SmolLM2's, or a model's own) into one with the same special tokens.
The templates reproduce the layout of the released LLaVA-OV-Qwen2 and Qwen-VL processors.
"""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> Any:
    """A ``Qwen2Tokenizer`` over bytes (no merges) with the ChatML and vision special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2Tokenizer(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer.chat_template = CHATML
    return tokenizer


def with_chat_tokens(tokenizer: Any) -> Any:
    """Give a real tokenizer the ChatML and vision special tokens (those it lacks) and
    the ChatML template; end of turn ``<|im_end|>``, padding ``<|endoftext|>``."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHATML
    return tokenizer


# Chat format of the LLaVA-OV-Qwen2 processors: "<|im_start|>{role}\n", then one <image>
# per image, one <video> per video, then "\n" + text for each text part, "<|im_end|>\n".
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}{{ '<video>' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ '\\n' + part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A Qwen-VL style processor chat template: structured content (text / video / image items)
# or plain strings, ChatML turns. The real Qwen2.5-VL and Qwen3-VL templates render a video
# item as "<|vision_start|><|video_pad|><|vision_end|>" and text-only turns as plain ChatML.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_vl_token_ids(tokenizer: Any) -> dict[str, int]:
    """The Qwen-VL config's vision token ids, as this tokenizer numbers them."""
    return {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
