"""The answer graphs' text-model forward in about half the kernels of the transformers one.

A question's prefill and a decode step read the weights once (a few milliseconds on a
current GPU); what they add on top is the time of the ~35 small kernels each decoder layer
launches, which a CUDA graph replays but does not remove (measurements against the
weight-reading floor: docs/performance.md). For
decoder layers of the Llama/Qwen2 form (1D RoPE, or Qwen2(.5)-VL's sectioned M-RoPE, its
per-axis sections picked once per forward by :func:`layer_rotary`), this module runs the
same arithmetic with fewer kernels:

- the query, key and value projections as one matrix product, and the gate and up
  projections as one (:func:`fuse_linear_weights`: the layers' weights become views of one
  buffer, so no memory is added and the transformers modules keep working);
- rotary embedding of all query and key heads at once; rotary, each residual add with
  the next RMSNorm, and SiLU with the product by the up projection each as one kernel on
  CUDA (:mod:`hermes_policy.kernels.fused_ops`);
- keys and values written into the stream cache's buffers at device-side slots, and
  attention over a fixed window of those buffers masked by slot, as in
  :func:`~hermes_policy.attention.static.static_attention`: on CUDA one split-key pass with the mask
  computed from the slots (:mod:`hermes_policy.kernels.split_kv_attention`), else in half
  precision the scale and the mask folded into the score product
  (:func:`biased_slot_attention`);
- the norms round where the model's modules round (normalised in float32, rounded to
  the input dtype, then weighted).

:func:`chunk_text_forward` is the same forward for the ingest graphs
(:mod:`hermes_policy.graphs.chunk_graphs`): a chunk's input embeddings appended at each layer's
length, attention by the registered ragged attention function (so pseudo-query blocks and
attention captures of the forward's context apply as in the transformers forward). Other
layer types fall back to the transformers forward (:func:`supports_static_forward`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from hermes_policy.attention.capture import BMM_OUT_DTYPE, HALF_DTYPES
from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.dispatch import ragged_attention
from hermes_policy.attention.head_masks import heads_blocked
from hermes_policy.attention.lse import canonical_batch_stride
from hermes_policy.attention.masks import block_rows_needed, slots_blocked
from hermes_policy.attention.static import grouped_masked_attention
from hermes_policy.kernels import split_kv_attention
from hermes_policy.kernels.fused_ops import (
    add_rms_norm,
    rms_norm,
    rotary_and_pack,
    rotate_half_pairs,
    silu_and_mul,
)
from hermes_policy.models.fused_norm import STANDARD_RMS_NORMS

# the additive masks of all layers, built once per forward, at most this many bytes
# (a 16-token question on a 4K window: 55 MB for 28 layers)
MASK_BIAS_BYTES = 1 << 28

# decoder layers whose forward is: x + o(attn(rope(qkv(norm1(x))))), then
# x + down(act(gate(norm2(x))) * up(norm2(x))), with rotate-half RoPE
STATIC_LAYER_TYPES = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"})
# the same form with sectioned 3D M-RoPE (temporal, height, width sections of the rotary axis)
SECTIONED_LAYER_TYPES = frozenset({"Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer"})


SILU_TYPES = frozenset({"SiLU", "SiLUActivation"})


def _plain_linear(module: object) -> bool:
    """A ``torch.nn.Linear`` itself (not a quantised or adapter-wrapped subclass) with
    floating-point weights: stacking its weight gives the same products."""
    return type(module) is nn.Linear and module.weight.is_floating_point()


def _norm_parameters(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` of a standard RMSNorm module (``weight * rmsnorm(x)``), else None."""
    if type(module).__name__ not in STANDARD_RMS_NORMS:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return None if eps is None else (module.weight, float(eps))


def supports_static_forward(adapter: object) -> bool:
    """Whether :func:`static_text_forward` computes what the adapter's text model computes.

    Llama/Qwen2-form decoder layers with 1D RoPE, or Qwen2(.5)-VL's with sectioned M-RoPE;
    no sliding window.
    """
    axes = getattr(adapter, "position_axes", None)
    if axes == 1:
        layer_types = STATIC_LAYER_TYPES
    elif axes == 3 and mrope_section(adapter) is not None:
        layer_types = SECTIONED_LAYER_TYPES
    else:
        return False
    text = adapter.text_model
    if not all(hasattr(text, name) for name in ("embed_tokens", "norm", "layers")):
        return False
    for layer in text.layers:
        if type(layer).__name__ not in layer_types:
            return False
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None) is not None:
            return False
        if not all(_plain_linear(getattr(attn, p, None)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return False
        if not all(_plain_linear(getattr(layer.mlp, p, None)) for p in ("gate_proj", "up_proj", "down_proj")):
            return False
        if type(getattr(layer.mlp, "act_fn", None)).__name__ not in SILU_TYPES:
            return False
        if not all(_norm_parameters(n) for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False
    return _norm_parameters(text.norm) is not None


def mrope_section(adapter: object) -> list[int] | None:
    """The rotary half-dimensions of M-RoPE's temporal, height and width sections."""
    section = getattr(adapter.rotary_emb, "mrope_section", None)
    if section is None:
        config = adapter.text_config
        for name in ("rope_parameters", "rope_scaling"):
            params = getattr(config, name, None)
            if isinstance(params, dict) and params.get("mrope_section") is not None:
                section = params["mrope_section"]
                break
    return None if section is None else [int(n) for n in section]


def layer_rotary(adapter: object, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos and sin ``(layers, q, head_dim)`` of each layer's ``positions (layers, axes, q)``.

    With M-RoPE, transformers versions differ: some rotary modules return one table per
    axis ``(3, batch, q, head_dim)`` and the attention picks each section from its axis,
    others return the sections already picked; both come out here as the picked table.
    """
    probe = torch.zeros((), dtype=adapter.dtype, device=positions.device)
    if positions.shape[1] == 1:
        return adapter.rotary_emb(probe, positions[:, 0, :])
    cos, sin = adapter.rotary_emb(probe, positions.permute(1, 0, 2))
    if cos.dim() == 4:  # (3, layers, q, head_dim): take each section from its axis
        sections = mrope_section(adapter) * 2
        cos, sin = (
            torch.cat([part[i % 3] for i, part in enumerate(table.split(sections, dim=-1))], dim=-1)
            for table in (cos, sin)
        )
    return cos, sin


def _same_storage_in_order(tensors: list[torch.Tensor], fused: torch.Tensor) -> bool:
    start = fused.data_ptr()
    for t in tensors:
        if t.data_ptr() != start or not t.is_contiguous():
            return False
        start += t.numel() * t.element_size()
    return start == fused.data_ptr() + fused.numel() * fused.element_size()


def fuse_linear_weights(modules: list[nn.Linear], owner: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linear layers with one input into one buffer.

    The modules' parameters are replaced by views of the stacked buffer (same values, no
    memory added once the old tensors are freed), so ``F.linear(x, weight, bias)`` of the
    result equals the concatenation of the modules' outputs. Kept on ``owner`` under
    ``name`` and reused while the modules still point into it (a model moved or reloaded
    since is fused again). The model still saves and reloads as before (tested).

    Returns
    -------
    weight ``(sum of out_features, in_features)``, bias ``(sum of out_features,)`` or None
    """
    weights = [m.weight for m in modules]
    biases = [m.bias for m in modules]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("cannot fuse linear layers where only some have a bias")
    cached = getattr(owner, name, None)
    if cached is not None:
        weight, bias = cached
        if _same_storage_in_order(weights, weight) and (bias is None or _same_storage_in_order(biases, bias)):
            return weight, bias
    # plain tensors even when called under inference mode: they become the model's parameters
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        start = 0
        for module in modules:
            rows = module.weight.shape[0]
            module.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
            start += rows
    setattr(owner, name, (weight, bias))
    return weight, bias


def prepare_static_forward(adapter: object) -> None:
    """Fuse every layer's projections now (a graph capture must not allocate them)."""
    for layer in adapter.text_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fuse_linear_weights([attn.q_proj, attn.k_proj, attn.v_proj], attn, "hermes_fused_qkv")
        fuse_linear_weights([mlp.gate_proj, mlp.up_proj], mlp, "hermes_fused_gate_up")


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: ``rotate_half(x) * sin == swap_halves(x) * signed_sin(sin)``."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def slot_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocked: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of ``q`` new tokens over a window of a layer's buffer, masked by slot.

    Parameters
    ----------
    query : ``(q, heads, head_dim)``
    keys, values : ``(1, kv_heads, window, head_dim)``
    blocked : BoolTensor ``(q, window)``, True where a token may not look

    Returns
    -------
    ``(q, heads, head_dim)``
    """
    out = grouped_masked_attention(query.transpose(0, 1)[None], keys, values, blocked, scaling)
    return out[0].transpose(0, 1)


def stacked_mask_bias(blocked: torch.Tensor, groups: int) -> torch.Tensor:
    """Additive float32 masks ``(layers, groups * q, window)`` from ``blocked (layers, q, window)``:
    ``-inf`` where blocked, else 0; row ``j * q + i`` is token ``i`` (query heads stacked
    per KV head, as :func:`~hermes_policy.attention.capture.grouped_scores` stacks them)."""
    layers, q_len, window = blocked.shape
    stacked = blocked[:, None].expand(layers, groups, q_len, window).reshape(layers, groups * q_len, window)
    return torch.zeros(stacked.shape, dtype=torch.float32, device=blocked.device).masked_fill_(stacked, float("-inf"))


def biased_slot_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """:func:`slot_attention` with the mask as an additive bias, on CUDA in half precision:
    scale, mask and score product in one kernel (``baddbmm`` writing float32), then the
    softmax and the value product.

    Parameters
    ----------
    query : ``(q, heads, head_dim)``
    keys, values : ``(1, kv_heads, window, head_dim)``
    bias : ``(groups * q, window)`` from :func:`stacked_mask_bias`
    """
    q_len, heads, dim = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    stacked = query.permute(1, 0, 2).reshape(kv_heads, groups * q_len, dim)
    if query.device.type == "cuda" and BMM_OUT_DTYPE:
        scores = torch.baddbmm(bias, stacked, keys[0].transpose(1, 2), out_dtype=torch.float32, alpha=scaling)
    else:  # the same arithmetic in float32 (CPU, tests)
        scores = torch.baddbmm(bias, stacked.float(), keys[0].transpose(1, 2).float(), alpha=scaling)
    # two aten kernels: compiled into one (as a split reduction or one pass per row) the
    # softmax and its cast ran slower on these few rows of a 4K-key window
    # (docs/performance.md)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.bmm(probs, values[0])  # (kv_heads, groups * q, dim)
    return out.view(kv_heads, groups, q_len, dim).permute(2, 0, 1, 3).reshape(q_len, heads, dim)


def _rotated_projections(
    attn: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed: bool
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """One matrix product for the query, key and value projections of ``normed (1, q,
    hidden)``, then rotary.

    Returns
    -------
    query ``(q, heads, head_dim)``, and the keys and values: packed ``(2, kv_heads, q,
    head_dim)`` for one write into a combined buffer (``packed``), else ``(key, value)``
    each ``(kv_heads, q, head_dim)``
    """
    head_dim = attn.head_dim
    heads = attn.q_proj.out_features // head_dim
    kv_heads = attn.k_proj.out_features // head_dim
    q_len = normed.shape[-2]
    weight, bias = fuse_linear_weights([attn.q_proj, attn.k_proj, attn.v_proj], attn, "hermes_fused_qkv")
    qkv = F.linear(normed, weight, bias).view(q_len, heads + 2 * kv_heads, head_dim)
    if packed:
        return rotary_and_pack(qkv, cos, sin, heads)
    rotated = rotate_half_pairs(qkv[:, : heads + kv_heads], cos, sin)
    return rotated[:, :heads], (rotated[:, heads:].transpose(0, 1), qkv[:, heads + kv_heads :].transpose(0, 1))


def _rest_of_layer(layer: nn.Module, hidden: torch.Tensor, attended: torch.Tensor, next_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """After attention: the output projection of ``attended (q, heads, head_dim)``, the
    residual add with the post-attention norm, the MLP (gate and up as one product, SiLU
    times up as one kernel), and the residual add with ``next_norm`` (the next layer's
    input norm, or the final norm). Returns ``(hidden, normed)``, each ``(1, q, hidden)``."""
    attn, mlp = layer.self_attn, layer.mlp
    q_len = attended.shape[0]
    out = attn.o_proj(attended.reshape(1, q_len, -1))
    hidden, normed = add_rms_norm(hidden, out, *_norm_parameters(layer.post_attention_layernorm))
    weight, bias = fuse_linear_weights([mlp.gate_proj, mlp.up_proj], mlp, "hermes_fused_gate_up")
    mlp_out = mlp.down_proj(silu_and_mul(F.linear(normed, weight, bias)))
    return add_rms_norm(hidden, mlp_out, *_norm_parameters(next_norm))


def _next_norm(text: nn.Module, index: int) -> nn.Module:
    """The norm after layer ``index``'s residual: the next layer's input norm, or the final one."""
    return text.layers[index + 1].input_layernorm if index + 1 < len(text.layers) else text.norm


def static_text_forward(
    adapter: object,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    window: int,
    cache: object,
    head_masks: tuple[torch.Tensor | None, ...] | None = None,
) -> torch.Tensor:
    """The text model on ``input_ids (1, q)`` with keys/values written at fixed slots.

    Parameters
    ----------
    positions : LongTensor ``(layers, axes, q)``: each layer's RoPE positions of the new tokens
    slots : LongTensor ``(layers, q)``: where layer ``l`` writes token ``i``; token ``i``
        attends to the slots ``<= slots[l, i]`` of the first ``window``
    cache : a :class:`~hermes_policy.cache.stream_cache.StreamCache` with room for the slots
    head_masks : per layer, which cached tokens each KV head sees (per-head retention,
        :mod:`~hermes_policy.attention.head_masks`), or None: a masked layer runs the
        explicit masked products (no split-key kernel, no bias)

    Returns
    -------
    hidden states ``(1, q, hidden)`` after the final norm. Every shape is fixed by the
    inputs' shapes and ``window``: the body of a CUDA graph.
    """
    text = adapter.text_model
    layers = list(text.layers)
    cos, sin = layer_rotary(adapter, positions)  # (layers, q, head_dim)
    cos, sin = cos[:, :, None, :], signed_sin(sin)[:, :, None, :]  # broadcast over heads
    first = layers[0].self_attn
    groups = first.q_proj.out_features // first.k_proj.out_features
    # each token sees the slots up to its own: the split-key kernel computes that mask
    # itself; the explicit paths get it as a tensor
    split_kv = split_kv_attention.available(positions.device, first.head_dim)
    blocked = None if split_kv else slots_blocked(slots, window)  # (layers, q, window)
    bias = None
    if (
        not split_kv
        and positions.device.type == "cuda"
        and adapter.dtype in HALF_DTYPES
        and BMM_OUT_DTYPE
        and blocked.numel() * groups * 4 <= MASK_BIAS_BYTES
    ):
        bias = stacked_mask_bias(blocked, groups)
    hidden = text.embed_tokens(input_ids)
    normed = rms_norm(hidden, *_norm_parameters(layers[0].input_layernorm))
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        cache_layer = cache.layers[index]
        key_buffer, value_buffer = cache_layer.buffers  # (1, kv_heads, capacity, head_dim)
        combined = cache_layer.kv_buffer  # (2, 1, kv_heads, capacity, head_dim) or None
        query, new = _rotated_projections(attn, normed, cos[index], sin[index], packed=combined is not None)
        if combined is not None:  # keys and values written by one kernel
            combined[:, 0].index_copy_(2, slots[index], new)
        else:
            key_buffer[0].index_copy_(1, slots[index], new[0])
            value_buffer[0].index_copy_(1, slots[index], new[1])
        window_keys, window_values = key_buffer[:, :, :window], value_buffer[:, :, :window]
        out = None
        head_mask = None if head_masks is None else head_masks[index]
        if head_mask is not None:  # per-head retention: slots and heads masked explicitly
            masked = slots_blocked(slots[index], window)[None] | heads_blocked(head_mask, window)
            out = slot_attention(query, window_keys, window_values, masked, attn.scaling)
        elif split_kv:
            out = split_kv_attention.attend(query, window_keys, window_values, slots[index], attn.scaling)
            if out is None:  # the kernel cannot run here: the explicit path from this layer on
                split_kv = False
                blocked = slots_blocked(slots, window)
        if out is None and bias is not None:
            out = biased_slot_attention(query, window_keys, window_values, bias[index], attn.scaling)
        elif out is None:
            out = slot_attention(query, window_keys, window_values, blocked[index], attn.scaling)
        hidden, normed = _rest_of_layer(layer, hidden, out, _next_norm(text, index))
    return normed


def _blocks_within(lead: int, sizes: list[int], rows: int) -> list[int]:
    """The leading blocks that end within the first ``rows`` rows (after ``lead`` rows)."""
    ends = itertools.accumulate(sizes, initial=lead)
    next(ends)  # the lead's own end
    return [size for size, end in zip(sizes, ends) if end <= rows]


def chunk_text_forward(
    adapter: object,
    inputs_embeds: torch.Tensor,
    positions: torch.Tensor,
    cache: object,
    lengths: tuple[int, ...],
    need_output: bool = True,
    attention: AttentionContext | None = None,
) -> torch.Tensor | None:
    """The text model on ``inputs_embeds (1, q, hidden)`` appended at each layer's length.

    The decoder layers' arithmetic of :func:`static_text_forward` (fused projections,
    rotary with key/value packing, residual adds with the next norm, SiLU-and-multiply);
    attention through :func:`~hermes_policy.attention.ragged_attention` over the layer's
    keys up to the new tokens, as the transformers forward calls it (pseudo-query blocks,
    attention captures and the split chunk attention all apply).

    Parameters
    ----------
    positions : LongTensor ``(layers, axes, q)``: each layer's RoPE positions of the new tokens
    cache : a :class:`~hermes_policy.cache.stream_cache.StreamCache` with room for ``q`` more
        tokens after ``lengths``; every layer's length is set to its ``length + q`` (fewer
        without ``need_output``, see there)
    lengths : each layer's length before the chunk
    need_output : False for ingest, which keeps only the cache (and what attention
        captures collect): the last layer then writes its keys and values, runs attention
        only where a capture reads it, and skips its output projection, MLP and the final
        norm (about a layer's worth of a 28-layer forward); and trailing pseudo-query
        blocks stop at the last layer that captures them, after its attention (no output
        projection or MLP there: :func:`~hermes_policy.attention.masks.block_rows_needed`; their
        slots beyond are not written, and the caller drops the blocks' slots afterwards)
    attention : the forward's attention context (query blocks, a capture), as the
        transformers forward would hand it to each layer

    Returns
    -------
    hidden states ``(1, q, hidden)`` after the final norm (the text model's last hidden
    state), or None without ``need_output``. Every shape is fixed by the inputs' shapes and
    ``lengths``: the body of a CUDA graph.
    """
    text = adapter.text_model
    layers = list(text.layers)
    q_len = inputs_embeds.shape[1]
    attention = attention or AttentionContext()
    capture, block_layout = attention.capture, attention.blocks
    rows = [q_len] * len(layers)
    if not need_output and block_layout is not None:
        picked = [range(0) if capture is None else capture.rows(i, q_len) for i in range(len(layers))]
        rows = block_rows_needed(block_layout[0], list(block_layout[1]), picked)
    cos, sin = layer_rotary(adapter, positions)  # (layers, q, head_dim)
    cos, sin = cos[:, :, None, :], signed_sin(sin)[:, :, None, :]  # broadcast over heads
    hidden = inputs_embeds
    normed = rms_norm(hidden, *_norm_parameters(layers[0].input_layernorm))
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        n = rows[index]
        layer_attention = attention
        if n < hidden.shape[1]:  # trailing blocks no longer read: dropped from here on
            # (a size-1 batch stride of the rows' own length: the fused ops compiled for
            # one stride pattern, not one per length they were cut from)
            hidden, normed = canonical_batch_stride(hidden[:, :n]), canonical_batch_stride(normed[:, :n])
        if n < q_len:  # this layer's attention sees the blocks still here
            lead, sizes = block_layout
            kept = _blocks_within(lead, list(sizes), n)
            layer_attention = attention.with_changes(blocks=(lead, kept) if kept else None)
        cache_layer = cache.layers[index]
        start, end = lengths[index], lengths[index] + n
        key_buffer, value_buffer = cache_layer.buffers  # (1, kv_heads, capacity, head_dim)
        combined = cache_layer.kv_buffer  # (2, 1, kv_heads, capacity, head_dim) or None
        query, new = _rotated_projections(attn, normed, cos[index, :n], sin[index, :n], packed=combined is not None)
        if combined is not None:  # keys and values written by one kernel
            combined[:, 0, :, start:end] = new
        else:
            key_buffer[0, :, start:end], value_buffer[0, :, start:end] = new
        cache_layer.length = end
        last = index == len(layers) - 1
        if last and not need_output:
            if capture is None or not len(capture.rows(index, n)):
                return None  # nothing reads this layer's attention
            # only the captured rows are read: a lead before query blocks (a chunk's
            # frames before its pseudo-queries) needs no attention here
            layer_attention = layer_attention.with_changes(lead_read=False)
        # (1, heads, q, head_dim) over the token-major rows, the layout transformers passes
        out, _ = ragged_attention(
            attn,
            query.transpose(0, 1)[None],
            key_buffer[:, :, :end],
            value_buffer[:, :, :end],
            None,
            attn.scaling,
            attention_context=layer_attention,
        )
        if last and not need_output:
            return None  # the capture has what it reads
        read_next = rows[index + 1] if not last else n
        if read_next < n:  # blocks this layer captured last: no output projection or MLP
            hidden, out = canonical_batch_stride(hidden[:, :read_next]), out[:, :read_next]
        hidden, normed = _rest_of_layer(layer, hidden, out[0], _next_norm(text, index))
    return normed
