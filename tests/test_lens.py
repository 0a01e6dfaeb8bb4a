"""Independent cross-check of our attention capture against TransformerLens' ``hook_pattern``.

Needs the ``lens`` extra (``pip install -e .[lens]``); skipped with a reason otherwise.

TransformerLens 4 removed ``HookedTransformer`` / ``HookedTransformerConfig``. Their offline
equivalent is ``TransformerBridge.boot_native(TransformerBridgeConfig)``: TransformerLens' own
transformer (its own RMS norm, rotary, grouped-query attention and softmax; no transformers
code), whose ``blocks.{l}.attn.hook_pattern`` is the probability tensor that multiplies the
values. 4.x has no standalone HF-to-TransformerLens Llama weight converter any more (the old
``pretrained/weight_conversions`` package is gone), so the state dict is mapped here by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "transformer_lens",
    reason="TransformerLens is not installed (the optional `lens` extra: pip install -e .[lens])",
)

from transformer_lens import TransformerBridgeConfig  # noqa: E402
from transformer_lens.model_bridge.sources.native import boot as boot_native  # noqa: E402

from hermes_policy import StreamingSession  # noqa: E402
from hermes_policy.attention.capture import AttentionCapture  # noqa: E402
from hermes_policy.attention.context import AttentionContext
from hermes_policy.models import StreamPiece, load_adapter  # noqa: E402

ROWS = 6  # query rows compared: the last ROWS tokens of the piece


def lens_config(hf) -> TransformerBridgeConfig:
    """A TransformerLens config for a Llama-style HF config, written out field by field."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    assert rope.get("rope_type", "default") == "default", "only plain RoPE is mapped here"
    theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    # TransformerBridgeConfig stores rotary_base as int(...): a fractional base would be cut.
    assert theta == int(theta)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    return TransformerBridgeConfig(
        d_model=hf.hidden_size,
        d_head=head_dim,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_key_value_heads=hf.num_key_value_heads,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=hf.hidden_act,
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=hf.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim,
        rotary_base=theta,
        dtype=torch.float32,
        seed=0,
    )


def halves_to_adjacent(n_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Row order that turns HF's rotate-half layout into TransformerLens-native adjacent pairs.

    HF Llama rotates dimension i together with i + rotary_dim/2; TransformerLens' native
    rotary rotates (2i, 2i+1), whatever ``cfg.rotary_adjacent_pairs`` says. Reordering the
    query and key rows of every head the same way leaves q.k, hence the pattern, unchanged.
    """
    half = rotary_dim // 2
    within = torch.arange(rotary_dim).view(2, half).t().reshape(-1)
    within = torch.cat([within, torch.arange(rotary_dim, head_dim)])
    return (torch.arange(n_heads)[:, None] * head_dim + within).reshape(-1)


def lens_state_dict(hf_model, cfg: TransformerBridgeConfig) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM weights under the native bridge's keys (biases zero)."""
    hf = {name: t.detach().float() for name, t in hf_model.state_dict().items()}
    q_rows = halves_to_adjacent(cfg.n_heads, cfg.d_head, cfg.rotary_dim)
    k_rows = halves_to_adjacent(cfg.n_key_value_heads, cfg.d_head, cfg.rotary_dim)
    out = {
        "embed.weight": hf["model.embed_tokens.weight"],
        "ln_final.weight": hf["model.norm.weight"],
        "unembed.weight": hf["lm_head.weight"],
        "unembed.bias": torch.zeros(cfg.d_vocab),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        weights = {
            "ln1.weight": hf[src + "input_layernorm.weight"],
            "ln2.weight": hf[src + "post_attention_layernorm.weight"],
            "attn.q.weight": hf[src + "self_attn.q_proj.weight"][q_rows],
            "attn.k.weight": hf[src + "self_attn.k_proj.weight"][k_rows],
            "attn.v.weight": hf[src + "self_attn.v_proj.weight"],
            "attn.o.weight": hf[src + "self_attn.o_proj.weight"],
            "mlp.gate.weight": hf[src + "mlp.gate_proj.weight"],
            "mlp.in.weight": hf[src + "mlp.up_proj.weight"],
            "mlp.out.weight": hf[src + "mlp.down_proj.weight"],
        }
        for proj in "qkvo":
            rows = weights[f"attn.{proj}.weight"].shape[0]
            weights[f"attn.{proj}.bias"] = torch.zeros(rows)
        out.update({dst + name: tensor for name, tensor in weights.items()})
    return out


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir: Path):
    return load_adapter(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def lens_model(adapter):
    cfg = lens_config(adapter.text_config)
    bridge = boot_native(cfg, device="cpu")
    bridge.load_state_dict(lens_state_dict(adapter.model, cfg), strict=True)
    return bridge.eval()


def test_lens_reproduces_hf_logits(adapter, lens_model):
    """The hand-made config and weight map are right: same logits as transformers."""
    ids = torch.tensor([adapter.encode_text("The red ball rolls under the chair.")])
    with torch.inference_mode():
        expected = adapter.model(input_ids=ids).logits
        got = lens_model(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_capture_equals_lens_hook_pattern(adapter, lens_model):
    """Per-head probabilities captured during a session prefill (system prefix cached, then a
    piece) equal TransformerLens' hook_pattern on the whole sequence in one forward."""
    text = "A dog runs to the door, stops, and looks back at the ball."
    ids = torch.tensor(adapter.encode_text(text))
    session = StreamingSession(adapter, chunk_frames=1)
    prefix_ids = adapter.prefix_piece(session.system_prompt).input_ids
    capture = AttentionCapture(adapter.attention_modules, query_rows=slice(-ROWS, None))
    with torch.inference_mode():
        session._prefill(StreamPiece.text(ids, adapter.position_axes), attention=AttentionContext(capture=capture))
    all_ids = torch.cat([prefix_ids, ids])[None]
    assert all(
        session.store.length(layer) == all_ids.shape[1] for layer in range(adapter.num_layers)
    )

    with torch.inference_mode():
        _, cache = lens_model.run_with_cache(
            all_ids, names_filter=lambda name: name.endswith("attn.hook_pattern")
        )
    lens_names = {name for name in cache if name.endswith("attn.hook_pattern")}
    assert set(capture.patterns) == lens_names
    assert lens_names == {AttentionCapture.hook_name(layer) for layer in range(adapter.num_layers)}
    for name in sorted(lens_names):
        got = capture.patterns[name]
        want = cache[name][:, :, -ROWS:].float()
        assert got.shape == want.shape == (1, adapter.num_heads, ROWS, all_ids.shape[1])
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |ours - TransformerLens| = {diff:.2e}"
