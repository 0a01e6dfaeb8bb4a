"""Tiny Llama models with hand-set weights whose layers have KNOWN attention behaviour.

They are the probe's planted ground truth (DESIGN.md, "Testing strategy"): the probe must
recover, from recorded attention alone, which layers were built recency-biased and which
were built to attend to a per-frame anchor token.

How the weights are set
-----------------------
Residual stream = token embedding at every layer. Every ``o_proj`` (weight and bias) and
every MLP ``down_proj`` is zero, so no layer writes anything to the residual stream.
Layer ``l``'s attention therefore depends only on the token embeddings and the positions,
and each layer's behaviour can be planted independently of the others.

Queries and keys. ``attention_bias=True`` gives ``q_proj``/``k_proj`` a bias. All q/k
weights are zero except one column of ``k_proj`` (anchor layers), so the query of every
token is the constant bias ``b_q`` and the key of every ordinary token is the constant
bias ``b_k``. RoPE pairs dimension ``j`` with ``j + head_dim/2`` and turns that pair by
``position * w_j``, ``w_j = rope_theta ** (-2j / head_dim)``. A query at position ``m``
and a key at ``n = m - D`` with components ``r_q, r_k`` in pair ``j`` at angles
``a_q, a_k`` score ``r_q r_k cos(w_j D + a_q - a_k)``: a function of the distance ``D``
alone, whose shape is set by the frequency and the angle.

- ``recency`` layers: ``b_q``, ``b_k`` in the *recency pair* (the highest-frequency pair
  with ``w span <= 1`` rad, ``span`` = the largest query-key distance the probe will see,
  i.e. window + question length). The angles put the middle of ``[0, span]`` at the
  inflection point of the cosine (``w D + a_q - a_k = pi/2`` at ``D = span/2``), where
  ``cos`` is linear: the score falls by ``kappa`` per token of distance (to within
  ``1 - cos(0.5) = 12%`` at the ends of the span), so the attention is an exponential
  ``a(d) ~ exp(-kappa d)`` in the distance ``d`` from the newest token, whatever the
  query token's own offset (that offset cancels when the probe renormalises over the
  stream). ``kappa`` is planted: ``r_q r_k w / sqrt(head_dim) = kappa``.
- ``anchor`` layers: the anchor token's embedding is ``e_c`` (a channel ``c`` every other
  token has at 0). After RMSNorm it is ``sqrt(hidden) e_c``, and one column of ``k_proj``
  copies it into the *anchor pair* (the lowest-frequency pair), so only the anchor token
  has a key there; ``b_q`` has a component in that pair. The lowest-frequency pair turns
  by ``w_low span`` (0.13 rad with the defaults) over the whole span, and its angle is set
  so the cosine peaks at ``D = span/2``: the anchor's logit is ``A cos(w_low (D - span/2))``,
  constant to within ``A (1 - cos(w_low span / 2))`` (< 0.02 with the defaults) and with
  no monotone trend. Every ordinary token scores 0. So each frame's anchor token gets
  ``e^A`` times the attention of an ordinary token, regardless of its distance: one
  attention peak per frame, at the anchor's in-frame offset.
- ``mixed`` layers: both, weaker (``kappa_mixed``, ``A_mixed``).
- ``uniform`` layers: zero q/k: flat attention over the window.

With the defaults (``head_dim`` 16, ``rope_theta`` 1e4, ``span`` 400) the recency pair is
``j = 6`` (``w = 1e-3``, 0.4 rad over the span) and the anchor pair ``j = 7``
(``w = 3.2e-4``). All heads of a layer are identical unless the layout gives the layer one
kind per KV head (planted head roles): then KV head ``j``'s key bias and anchor column, and
the query biases of its group (query heads ``j * H/K .. (j + 1) * H/K - 1``), are that
kind's. Values are random (irrelevant: ``o_proj`` is zero).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tiny_models import byte_tokenizer, vocab_size

KINDS = ("recency", "anchor", "mixed", "uniform")
ANCHOR_TOKEN = "<|video_pad|>"  # never produced by questions or the chat template


def default_anchor_token_id() -> int:
    return int(byte_tokenizer().convert_tokens_to_ids(ANCHOR_TOKEN))


def rope_frequencies(head_dim: int, rope_theta: float) -> torch.Tensor:
    """``w_j`` of each RoPE pair ``j`` (Llama's default rotary embedding)."""
    return rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def planted_pairs(head_dim: int, rope_theta: float, span: int) -> tuple[int, int]:
    """(recency pair, anchor pair) for query-key distances up to ``span``."""
    freqs = rope_frequencies(head_dim, rope_theta)
    anchor_pair = int(freqs.argmin())
    ok = [j for j in range(len(freqs)) if j != anchor_pair and float(freqs[j]) * span <= 1.0]
    if not ok:
        raise ValueError("no RoPE pair turns slowly enough over the span: raise rope_theta")
    recency_pair = max(ok, key=lambda j: float(freqs[j]))
    if float(freqs[anchor_pair]) * span > 0.2:
        raise ValueError("the lowest-frequency RoPE pair turns too fast over the span: raise rope_theta")
    return recency_pair, anchor_pair


def _kinds_per_kv_head(kind: str | tuple[str, ...], num_kv_heads: int) -> tuple[str, ...]:
    kinds = (kind,) * num_kv_heads if isinstance(kind, str) else tuple(kind)
    if len(kinds) != num_kv_heads:
        raise ValueError(f"{len(kinds)} head kinds for {num_kv_heads} KV heads")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown layer kinds {sorted(unknown)}; use {KINDS}")
    return kinds


def planted_llama(
    folder: Path,
    layout: dict[int, str | tuple[str, ...]],
    *,
    anchor_token_id: int | None = None,
    frame_period: int = 16,
    span: int = 400,
    recency_decay: float = 0.06,
    mixed_decay: float = 0.015,
    anchor_logit: float = 6.0,
    mixed_anchor_logit: float = 0.2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float = 1e4,
    seed: int = 0,
) -> Path:
    """Save a LlamaForCausalLM (+ byte tokenizer) whose layers behave as ``layout`` says.

    Parameters
    ----------
    folder : where to save
    layout : ``{layer: kind}`` for layers ``0..L-1``, kind in :data:`KINDS`, or a tuple of
        one kind per KV head (heads with different planted roles inside one layer)
    anchor_token_id : the per-frame anchor token (default ``<|video_pad|>``)
    frame_period : tokens per frame of the streams it is meant for (recorded in
        ``planted.json`` with the rest of the ground truth; the weights do not depend on it)
    span : largest query-key distance the behaviours must hold over (window + question)
    recency_decay, mixed_decay : planted ``kappa`` per token of the recency / mixed layers
    anchor_logit, mixed_anchor_logit : planted logit ``A`` of the anchor over ordinary tokens

    Writes ``planted.json`` (the ground truth) beside the model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = len(layout)
    if sorted(layout) != list(range(layers)) or layers == 0:
        raise ValueError(f"layout must name every layer 0..L-1, got {sorted(layout)}")
    head_kinds = {i: _kinds_per_kv_head(kind, num_kv_heads) for i, kind in layout.items()}
    tokenizer = byte_tokenizer()
    anchor_id = default_anchor_token_id() if anchor_token_id is None else int(anchor_token_id)
    head_dim = hidden_size // num_heads
    config = LlamaConfig(
        vocab_size=vocab_size(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rope_theta=rope_theta,
        attention_bias=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    freqs = rope_frequencies(head_dim, rope_theta)
    recency_pair, anchor_pair = planted_pairs(head_dim, rope_theta, span)
    centre = span / 2
    channel = hidden_size - 1  # the anchor channel

    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.normal_(0.0, 1.0)
        embed[:, channel] = 0.0
        embed[anchor_id] = 0.0
        embed[anchor_id, channel] = 1.0
        # RMSNorm (weight 1) turns the anchor embedding e_c into e_c / sqrt(1/H + eps)
        anchor_normed = 1.0 / math.sqrt(1.0 / hidden_size + config.rms_norm_eps)

        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.o_proj):
                proj.weight.zero_()
                proj.bias.zero_()
            mlp.down_proj.weight.zero_()
            layer.input_layernorm.weight.fill_(1.0)

            group = num_heads // num_kv_heads
            vectors = [
                _head_vectors(kind, head_dim, freqs, recency_pair, anchor_pair, centre, anchor_normed,
                              recency_decay, mixed_decay, anchor_logit, mixed_anchor_logit)
                for kind in head_kinds[index]
            ]
            attn.q_proj.bias.copy_(torch.cat([vectors[h // group][0] for h in range(num_heads)]).float())
            attn.k_proj.bias.copy_(torch.cat([v[1] for v in vectors]).float())
            attn.k_proj.weight[:, channel] = torch.cat([v[2] for v in vectors]).float()

    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    truth = {
        "layout": {str(i): layout[i] if isinstance(layout[i], str) else list(layout[i]) for i in range(layers)},
        "anchor_token_id": anchor_id,
        "frame_period": frame_period,
        "span": span,
        "recency_pair": recency_pair,
        "anchor_pair": anchor_pair,
        "recency_decay": recency_decay,
        "mixed_decay": mixed_decay,
        "anchor_logit": anchor_logit,
        "mixed_anchor_logit": mixed_anchor_logit,
    }
    (folder / "planted.json").write_text(json.dumps(truth, indent=2))
    return folder


def _head_vectors(
    kind: str, head_dim: int, freqs: torch.Tensor, recency_pair: int, anchor_pair: int, centre: float,
    anchor_normed: float, recency_decay: float, mixed_decay: float, anchor_logit: float,
    mixed_anchor_logit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query bias, key bias, anchor column of ``k_proj``) of one head of ``kind``, each ``(head_dim,)``."""
    half = head_dim // 2
    decay = {"recency": recency_decay, "mixed": mixed_decay}.get(kind, 0.0)
    logit = {"anchor": anchor_logit, "mixed": mixed_anchor_logit}.get(kind, 0.0)
    q = torch.zeros(head_dim, dtype=torch.float64)
    k = torch.zeros(head_dim, dtype=torch.float64)
    if decay > 0:
        # score = r^2 cos(w D + angle); slope -r^2 w / sqrt(hd) at the centre.
        w = float(freqs[recency_pair])
        r = math.sqrt(decay * math.sqrt(head_dim) / w)
        angle = math.pi / 2 - w * centre
        q[recency_pair], q[recency_pair + half] = r * math.cos(angle), r * math.sin(angle)
        k[recency_pair] = r  # key at angle 0
    anchor_column = torch.zeros(head_dim, dtype=torch.float64)
    if logit > 0:
        # anchor key (1, 0) in the anchor pair; score = q_r cos(w D + angle), peak at the centre.
        w = float(freqs[anchor_pair])
        q_r = logit * math.sqrt(head_dim)
        angle = -w * centre
        q[anchor_pair], q[anchor_pair + half] = q_r * math.cos(angle), q_r * math.sin(angle)
        anchor_column[anchor_pair] = 1.0 / anchor_normed
    return q, k, anchor_column


def planted_frames(
    num_frames: int, frame_period: int, anchor_token_id: int, anchor_offset: int = 3, seed: int = 0
) -> torch.Tensor:
    """Text frames ``(T, N)`` of random ordinary byte tokens, the anchor at ``anchor_offset``."""
    if not 0 <= anchor_offset < frame_period:
        raise ValueError(f"anchor offset {anchor_offset} outside a frame of {frame_period} tokens")
    generator = torch.Generator().manual_seed(seed)
    ordinary = [t for t in range(256) if t != anchor_token_id]  # the byte alphabet
    picks = torch.randint(len(ordinary), (num_frames, frame_period), generator=generator)
    frames = torch.tensor(ordinary)[picks]
    frames[:, anchor_offset] = anchor_token_id
    return frames
