"""The model adapter interface: one adapter per architecture, one small surface.

An adapter turns stream input (video frames, or text frames for a plain causal LM) into
:class:`StreamPiece` objects: token ids, their positions *relative to the piece's start*,
the frame each token came from, and any extra model inputs (pixel values, grids). The
streaming session places pieces at absolute positions per layer and runs
:meth:`ModelAdapter.forward` on top of the KV store. Adapters also know the chat format
(system prefix, question, answer stop tokens) and the model's structure (layers, heads,
rotary module, position limit).
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hermes_policy.attention.context import AttentionContext, attention_kwargs
from hermes_policy.cache.positions import to_model_position_ids
from hermes_policy.cache.transfer import upload
from hermes_policy.models.fused_norm import use_fused_rms_norm

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant watching a live video stream. "
    "Answer questions about what you have seen concisely."
)
_STREAM_SENTINEL = "@@HERMES_STREAM@@"
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    """Name of the cache argument of a model class's forward.

    transformers renamed ``past_key_values`` to ``cache`` (5.24 warns about the old name;
    5.17, on the GPU machine, knows only the old one).
    """
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(module: nn.Module, cache: Any | None) -> dict[str, Any]:
    """Keyword arguments passing ``cache`` to ``module``'s forward under its own name."""
    return {_cache_argument(type(module)): cache, "use_cache": cache is not None}


@dataclass
class StreamPiece:
    """A run of tokens to prefill.

    Attributes
    ----------
    input_ids : LongTensor ``(seq,)``
    positions : LongTensor ``(axes, seq)``, relative to the first position of the piece
    frame_index : LongTensor ``(seq,)``: the stream frame of each token, -1 for plain text
    model_inputs : extra keyword inputs of the model's forward (pixel values, grids)
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    frame_index: torch.Tensor
    model_inputs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def extent(self) -> int:
        """How far the next piece's positions start after this one's (max position + 1)."""
        if not self.positions.numel():
            return 0
        # numpy for host positions: a torch reduction on the CPU has a fixed cost per call
        top = self.positions.numpy().max() if self.positions.device.type == "cpu" else self.positions.max()
        return int(top) + 1

    @classmethod
    def text(cls, ids: list[int] | torch.Tensor, axes: int) -> StreamPiece:
        # built in numpy: small torch operations on the CPU each have a fixed cost, and a
        # question's piece is on the time to first token
        ids = np.asarray(ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        positions = np.broadcast_to(np.arange(ids.shape[0], dtype=np.int64), (axes, ids.shape[0])).copy()
        return cls(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(np.full(ids.shape, -1, dtype=np.int64)))


class ModelAdapter(ABC):
    """Base class of the per-architecture adapters.

    Parameters
    ----------
    model : a transformers model (``...ForCausalLM`` or ``...ForConditionalGeneration``)
    tokenizer : its tokenizer
    processor : its multimodal processor, for video models
    name_or_path : where it was loaded from (recorded in reports and policies)
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    position_axes: ClassVar[int] = 1
    is_text_only: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any = None, name_or_path: str = ""):
        use_fused_rms_norm(model)  # fewer kernels per layer, the same rounding
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name_or_path = name_or_path

    # -- structure -------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def base_model(self) -> nn.Module:
        """The model without its LM head (takes ids, pixel inputs and positions)."""
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        """The decoder stack (has ``.layers`` and ``.rotary_emb``)."""
        base = self.base_model
        return getattr(base, "language_model", base)

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.text_model.layers)

    @property
    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.decoder_layers]

    @property
    def rotary_emb(self) -> nn.Module:
        return self.text_model.rotary_emb

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def max_positions(self) -> int:
        return int(self.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding part of the model (several for a model split by device_map)."""
        seen: dict[str, torch.device] = {}
        for param in self.model.parameters():
            seen.setdefault(str(param.device), param.device)
        return list(seen.values())

    @property
    def spans_devices(self) -> bool:
        return len(self.devices) > 1

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    @abstractmethod
    def tokens_per_frame(self) -> int:
        """Stream tokens one frame becomes (for video models, after pooling/merging)."""

    # -- chat format -----------------------------------------------------------------
    @property
    def video_marker(self) -> str | None:
        """What the processor's chat template renders for a video item (None: text-only)."""
        return None

    def _processor_template(self) -> str | None:
        template = getattr(self.processor, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        return template or None

    def _chat_template_parts(self, system_prompt: str) -> tuple[str, str]:
        """Split the chat template around the stream: (prefix text, text after the question).

        Video models with a processor template render a structured turn (a video item, then
        the question) and split it around :attr:`video_marker`; the text between the video
        and the question is kept in ``self._question_lead``. Otherwise the tokenizer's
        template (ChatML when it has none) is split around the user text, with ``"\n"``
        between the stream and the question.
        """
        template, marker = self._processor_template(), self.video_marker
        if template is not None and marker is not None:
            messages = [
                {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
                {
                    "role": "user",
                    "content": [{"type": "video"}, {"type": "text", "text": _STREAM_SENTINEL}],
                },
            ]
            rendered = self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
            head, sep, suffix = rendered.partition(_STREAM_SENTINEL)
            prefix, video_sep, lead = head.rpartition(marker)
            if sep and video_sep:
                self._question_lead = lead
                return prefix, suffix
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": _STREAM_SENTINEL},
        ]
        template = getattr(self.tokenizer, "chat_template", None) or _CHATML
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        prefix, sep, suffix = rendered.partition(_STREAM_SENTINEL)
        if not sep:
            raise ValueError("the chat template dropped the user message; cannot place the stream")
        self._question_lead = "\n"
        return prefix, suffix

    def encode_text(self, text: str) -> list[int]:
        # a fast tokenizer's Rust backend directly: the Python wrapper around it adds a
        # cost to every call, which a question's time to first token pays
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix_piece(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> StreamPiece:
        """The fixed system prefix: system turn plus the opening of the user turn."""
        prefix, suffix = self._chat_template_parts(system_prompt)
        self._answer_prompt_suffix = suffix
        return StreamPiece.text(self.encode_text(prefix), self.position_axes)

    def question_piece(self, question: str) -> StreamPiece:
        """The question after the stream, closing the user turn and opening the answer."""
        suffix = getattr(self, "_answer_prompt_suffix", None)
        if suffix is None:
            _, suffix = self._chat_template_parts(DEFAULT_SYSTEM_PROMPT)
        text = self._question_lead + question.strip() + suffix
        return StreamPiece.text(self.encode_text(text), self.position_axes)

    @property
    def stop_token_ids(self) -> set[int]:
        cached = getattr(self, "_stop_token_ids", None)
        if cached is None:
            cached = self._stop_token_ids = frozenset(self._find_stop_token_ids())
        return set(cached)

    def _find_stop_token_ids(self) -> set[int]:
        ids = set()
        for token in (self.tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            if token is None:
                continue
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                ids.add(tid)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # -- stream input ----------------------------------------------------------------
    @abstractmethod
    def frames_piece(
        self, frames: Any, first_frame: int, timestamps: list[float] | None = None
    ) -> StreamPiece:
        """Encode a chunk of frames into one piece.

        Parameters
        ----------
        frames : uint8 array ``(T, H, W, 3)`` for video models; a list of strings or a
            LongTensor ``(T, tokens_per_frame)`` for text-frame models
        first_frame : stream index of the first frame (recorded per token)
        timestamps : seconds of each frame in the stream, when known
        """

    def processor_device_kwargs(self) -> dict[str, Any]:
        """Run the video processor's tensor work on the model's GPU (resize, normalise)."""
        return {"device": str(self.device)} if self.device.type == "cuda" else {}

    def processor_video(self, frames: Any) -> torch.Tensor:
        """uint8 frames ``(T, H, W, 3)`` as a tensor on the video processor's device.

        Copied without waiting for queued GPU work: the processor's own blocking copy
        would wait for every kernel still queued (the previous chunk's compression).
        """
        return upload(torch.as_tensor(frames), self.processor_device_kwargs().get("device", "cpu"))

    def concat_model_inputs(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Merge the extra inputs of several pieces for one forward (reference runs)."""
        keys = {k for d in inputs for k in d}
        return {k: torch.cat([d[k] for d in inputs if k in d], dim=0) for k in keys}

    # -- running ---------------------------------------------------------------------
    def forward(
        self,
        piece: StreamPiece,
        positions: torch.Tensor,
        cache: Any | None = None,
        attention: AttentionContext | None = None,
    ) -> torch.Tensor:
        """Run the model (without LM head) on a piece at absolute ``positions``.

        Parameters
        ----------
        piece : the tokens to prefill
        positions : LongTensor ``(axes, seq)``, absolute positions of the piece's tokens
        cache : the cache to extend (None for a stateless forward)
        attention : what the attention of this forward needs besides its inputs (captures,
            query blocks); handed to every layer with the forward's keyword arguments

        Returns
        -------
        Tensor ``(1, seq, hidden)``: last hidden states
        """
        device = self.device
        extra = {k: upload(v, device) if isinstance(v, torch.Tensor) else v for k, v in piece.model_inputs.items()}
        out = self.base_model(
            input_ids=upload(piece.input_ids, device)[None],
            position_ids=to_model_position_ids(upload(positions, device)),
            **cache_kwargs(self.base_model, cache),
            **extra,
            **attention_kwargs(attention),
        )
        return out.last_hidden_state

    def input_embeddings(self, piece: StreamPiece) -> torch.Tensor | None:
        """The text model's input embeddings ``(1, seq, hidden)`` of a piece, on the model's device.

        What :meth:`forward` feeds the decoder stack, computed without waiting for the GPU
        (so the stack itself can be replayed from a CUDA graph, see
        :mod:`hermes_policy.graphs.chunk_graphs`). None where this adapter cannot split its forward
        so: here, pieces with extra model inputs (adapters of vision models override it).
        """
        inputs = self.embedding_graph_inputs(piece)
        if inputs is None:
            return None
        return self.embeddings_from_inputs({name: upload(value, self.device) for name, value in inputs.items()})

    def embedding_graph_inputs(self, piece: StreamPiece) -> dict[str, torch.Tensor] | None:
        """The tensors a piece's input embeddings are computed from, host-side or on the GPU.

        :meth:`embeddings_from_inputs` computes the embeddings from them (moved to the
        model's device) with no host work, so a CUDA graph can capture that step: on replay
        static buffers hold the next piece's tensors (:mod:`hermes_policy.graphs.chunk_graphs`).
        None where the step needs the host (here: pieces with extra model inputs; adapters
        of vision models override both methods where their vision tower allows it).
        """
        if piece.model_inputs:
            return None
        return {"input_ids": piece.input_ids[None]}

    def embeddings_from_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input embeddings ``(1, seq, hidden)`` from :meth:`embedding_graph_inputs`' tensors
        on the model's device."""
        return self.text_model.get_input_embeddings()(inputs["input_ids"])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits for hidden states ``(1, seq, hidden)`` -> ``(1, seq, vocab)``."""
        return self.model.get_output_embeddings()(hidden)
