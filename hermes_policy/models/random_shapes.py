"""Random-weight models of published shapes, built in memory (no download).

Speed and memory depend on a model's shapes, not on its weight values, so the efficiency
benchmark builds the real architectures from their public config values with random
weights, directly on the GPU, with an offline tokenizer (:func:`benchmark_tokenizer`) and
the model's own processor classes. The ``tiny-*`` shapes are the same architectures at
test size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from hermes_policy.attention.dispatch import use_ragged_attention
from hermes_policy.errors import HermesError
from hermes_policy.models.base import ModelAdapter
from hermes_policy.models.embedded import embedded_model_path
from hermes_policy.models.offline_tokenizer import (
    LLAVA_OV_CHAT_TEMPLATE,
    QWEN_VL_CHAT_TEMPLATE,
    byte_tokenizer,
    qwen_vl_token_ids,
    with_chat_tokens,
)

TOKENIZER_SOURCES = ("auto", "byte", "embedded")

# SigLIP-so400m as LLaVA-OneVision uses it (26 of its 27 layers), 384px frames
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
QWEN2_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
)


@dataclass(frozen=True)
class ModelShape:
    """One architecture at one size.

    Attributes
    ----------
    name : key in :data:`SHAPES`
    family : ``"llava_onevision"`` or ``"qwen2_5_vl"``
    text : text-model config values
    vision : vision-tower config values
    frame_size : (height, width) of the benchmark's frames (the vision tower's native size)
    source : where the values come from
    """

    name: str
    family: str
    text: dict[str, Any]
    vision: dict[str, Any]
    frame_size: tuple[int, int]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


SHAPES: dict[str, ModelShape] = {
    "llava-ov-7b": ModelShape(
        name="llava-ov-7b",
        family="llava_onevision",
        text=dict(QWEN2_7B_TEXT, vocab_size=152128, max_position_embeddings=32768, rope_theta=1_000_000.0),
        vision=SIGLIP_SO400M,
        frame_size=(384, 384),
        source="llava-hf/llava-onevision-qwen2-7b-ov-hf config: Qwen2-7B + SigLIP-so400m (26 layers used), 196 tokens/frame",
    ),
    "qwen2.5-vl-7b": ModelShape(
        name="qwen2.5-vl-7b",
        family="qwen2_5_vl",
        text=dict(QWEN2_7B_TEXT, max_position_embeddings=128000, mrope_section=[16, 24, 24], rope_theta=1_000_000.0),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=3584,
            tokens_per_second=2,
        ),
        frame_size=(448, 448),
        source="Qwen/Qwen2.5-VL-7B-Instruct config; 448x448 frames -> 128 tokens/frame",
    ),
    "llava-ov-72b": ModelShape(
        name="llava-ov-72b",
        family="llava_onevision",
        text=dict(
            vocab_size=152128,
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
        ),
        vision=SIGLIP_SO400M,
        frame_size=(384, 384),
        source="llava-hf/llava-onevision-qwen2-72b-ov-hf config: Qwen2-72B + SigLIP-so400m, 196 tokens/frame",
    ),
    "tiny-llava-ov": ModelShape(
        name="tiny-llava-ov",
        family="llava_onevision",
        text=dict(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
        ),
        vision=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=70, patch_size=14,
        ),
        frame_size=(70, 70),
        source="test size",
    ),
    "tiny-qwen2.5-vl": ModelShape(
        name="tiny-qwen2.5-vl",
        family="qwen2_5_vl",
        text=dict(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            mrope_section=[2, 3, 3], rope_theta=10000.0,
        ),
        vision=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
            out_hidden_size=64, tokens_per_second=2,
        ),
        frame_size=(56, 56),
        source="test size",
    ),
}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise HermesError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def benchmark_tokenizer(source: str = "auto", vocab_size: int | None = None) -> Any:
    """The tokenizer a random-weight model is built with.

    Parameters
    ----------
    source : ``"byte"`` (every byte one token: no file needed, but English takes ~5x the
        tokens of a real BPE), ``"embedded"`` (the byte-level BPE of the embedded SmolLM2
        GGUF, 49k tokens, of the same kind as Qwen2's 151k-token one), ``"auto"`` (the
        embedded one when its package is installed and it fits ``vocab_size``, else
        bytes), or the folder of a saved tokenizer (a model's own, or
        ``benchmark_tokenizer("embedded").save_pretrained(folder)`` carried to a machine
        without the embedded model)
    vocab_size : the model's vocabulary (``"auto"`` falls back to bytes above it)

    The ChatML and vision special tokens are added where missing (:func:`with_chat_tokens`).
    Loaded once per source and shared.
    """
    if source == "auto":
        try:
            embedded_model_path()
        except HermesError:
            return byte_tokenizer()
        tokenizer = _real_tokenizer("embedded")
        return tokenizer if vocab_size is None or len(tokenizer) <= vocab_size else byte_tokenizer()
    if source == "byte":
        return byte_tokenizer()
    return _real_tokenizer(source)


@lru_cache(maxsize=4)
def _real_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    if source == "embedded":
        gguf = embedded_model_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        if not Path(source).is_dir():
            raise HermesError(
                f"tokenizer {source!r} is neither one of {', '.join(TOKENIZER_SOURCES)} nor a folder"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            raise HermesError(f"no tokenizer could be loaded from {source}: {err}") from err
    return with_chat_tokens(tokenizer)


def tokenizer_description(tokenizer: Any) -> str:
    """One line naming a tokenizer's kind and size, for results files."""
    kind = "byte-level, no merges" if len(tokenizer) < 512 else "BPE"
    return f"{type(tokenizer).__name__} ({kind}, {len(tokenizer)} tokens)"


def _llava_onevision(shape: ModelShape, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = dict(shape.text)
    rope_theta = text.pop("rope_theta")
    text_config = Qwen2Config(
        **text,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = SiglipVisionConfig(**shape.vision, vision_use_head=False)
    size = shape.vision["image_size"]
    config = LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[size, size]],
        tie_word_embeddings=False,
    )
    pixels = {"height": size, "width": size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=pixels, image_grid_pinpoints=[[size, size]]),
        video_processor=LlavaOnevisionVideoProcessor(size=pixels),
        tokenizer=tokenizer,
        num_image_tokens=(size // shape.vision["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
    )
    return LlavaOnevisionForConditionalGeneration, (config, processor)


def _qwen2_5_vl(shape: ModelShape, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    text = dict(shape.text)
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": text.pop("mrope_section")}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            text,
            rope_parameters=rope,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(shape.vision),
        tie_word_embeddings=False,
        **qwen_vl_token_ids(tokenizer),
    )
    height, width = shape.frame_size
    pixels = height * width
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    common = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size, **common),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return Qwen2_5_VLForConditionalGeneration, (config, processor)


def build_random_adapter(
    shape: ModelShape | str,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    tokenizer: Any = "byte",
) -> ModelAdapter:
    """A model of ``shape`` with random weights, wrapped in its adapter.

    Parameters
    ----------
    device : where the whole model is built (ignored with ``device_map``)
    device_map : split the model over devices with accelerate: ``"balanced"`` (even over
        the visible GPUs), ``"auto"`` (fill them in order), or an explicit map from module
        names to devices; each weight is created directly on its device, so a model larger
        than one GPU never passes through one
    max_memory : per-device limits for ``"balanced"`` / ``"auto"`` (accelerate's format)
    tokenizer : a source for :func:`benchmark_tokenizer` or a tokenizer object
    """
    from hermes_policy.models.llava_onevision import LlavaOnevisionAdapter
    from hermes_policy.models.qwen_vl import Qwen2_5_VLAdapter

    shape = get_shape(shape) if isinstance(shape, str) else shape
    vocab_size = shape.text["vocab_size"]
    if isinstance(tokenizer, str):
        tokenizer = benchmark_tokenizer(tokenizer, vocab_size)
    if len(tokenizer) > vocab_size:
        raise HermesError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the {vocab_size} of shape {shape.name}; "
            "use the byte tokenizer"
        )
    builders = {"llava_onevision": (_llava_onevision, LlavaOnevisionAdapter), "qwen2_5_vl": (_qwen2_5_vl, Qwen2_5_VLAdapter)}
    build, adapter_cls = builders[shape.family]
    model_cls, (config, processor) = build(shape, tokenizer)
    torch.manual_seed(seed)
    if device_map is None:
        with torch.device(torch.device(device)):
            model = model_cls._from_config(config, dtype=dtype)
    else:
        model = _dispatched_random_model(model_cls, config, dtype, device_map, max_memory)
    model.eval()
    use_ragged_attention(model)
    return adapter_cls(model, processor.tokenizer, processor, name_or_path=f"random:{shape.name}")


def _random_value(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random-init values: biases 0, norm (1-D) weights 1, matrices and embeddings N(0, 0.02)."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02)


def device_of(name: str, device_map: dict[str, Any]) -> torch.device:
    """The device a parameter ``name`` goes to: the longest module prefix in the map."""
    best, target = -1, None
    for prefix, device in device_map.items():
        covers = prefix == "" or name == prefix or name.startswith(prefix + ".")
        if covers and len(prefix) > best:
            best, target = len(prefix), device
    if target is None:
        raise HermesError(f"the device map places no module holding {name}")
    if isinstance(target, int):
        return torch.device("cuda", target)
    return torch.device(target)


def _dispatched_random_model(
    model_cls: Any, config: Any, dtype: torch.dtype, device_map: str | dict[str, Any], max_memory: dict[Any, Any] | None
) -> Any:
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        model = model_cls._from_config(config, dtype=dtype)
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced"):
            raise HermesError(f"device_map must be 'auto', 'balanced' or a mapping, got {device_map!r}")
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map == "balanced":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    for name, param in list(model.named_parameters()):
        target = device_of(name, device_map)
        set_module_tensor_to_device(model, name, target, value=_random_value(name, param.shape, dtype, target))
    return dispatch_model(model, device_map=device_map)  # which records it as model.hf_device_map


def random_frames(shape: ModelShape, count: int, seed: int = 0):
    """``count`` random uint8 frames ``(count, height, width, 3)`` at the shape's frame size."""
    import numpy as np

    height, width = shape.frame_size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)
