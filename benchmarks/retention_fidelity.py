"""How close each retention rule stays to the full cache, at equal budgets.

On the embedded SmolLM2 (real weights) over the synthetic text stream with planted facts,
every rule streams the same frames under the same per-layer budget; at the end of the
stream each known question is scored against the full (unbounded) cache:

- KL(full || rule) of the next-token distribution after the question,
- log-probability of the known answer as the first words of the reply (teacher-forced,
  right after the chat template's assistant line, so without a leading space),
- whether the greedy answer contains the known answer.

Usage::

    python benchmarks/retention_fidelity.py [--frames 64] [--tokens-per-frame 48]
        [--budget 768] [--policy runs/demo/policy.json] [--device cpu]

Results go to ``benchmarks/results/retention-fidelity-<device>-<date>.{json,md}`` with the
command, device and date.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from hermes_policy import StreamingSession
from hermes_policy.inputs.synthetic_text import text_stream
from hermes_policy.models import load_adapter
from hermes_policy.policy import ModelInfo, Policy, paper_default
from hermes_policy.retention import (
    AttentionRetention,
    FifoRetention,
    FullRetention,
    HermesRetention,
    SinkRecentRetention,
    UniformRetention,
)

RESULTS = Path(__file__).parent / "results"


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(p || q) of two logit vectors, in nats."""
    p = torch.log_softmax(reference.double(), -1)
    q = torch.log_softmax(other.double(), -1)
    return float((p.exp() * (p - q)).sum())


def rules(adapter, budget: int, policy_path: str | None) -> dict[str, object]:
    info = ModelInfo.of(adapter)
    out = {
        "fifo": FifoRetention(budget=budget),
        "sink+recent": SinkRecentRetention(budget=budget, sink=4),
        "uniform": UniformRetention(budget=budget),
        "attention-only": AttentionRetention(budget=budget),
        "hermes (paper-default)": HermesRetention(policy=paper_default(info, budget=budget)),
    }
    if policy_path:
        probed = Policy.load(policy_path)
        data = probed.to_dict()
        for layer in data["layers"]:
            layer["budget"] = budget
        data["budget"]["video_tokens_per_layer"] = budget
        out["hermes (probed policy)"] = HermesRetention(policy=Policy.from_dict(data, policy_path))
    return out


def evaluate(session: StreamingSession, questions, reference=None) -> dict:
    rows = []
    for q in questions:
        logits = session.next_token_logits(q.question)
        answer = session.ask(q.question, max_new_tokens=24)
        rows.append({
            "question": q.question,
            "expected": q.answer,
            "logits": logits,
            "answer_logprob": session.answer_logprob(q.question, q.answer),
            "greedy": answer.text,
            "correct": q.answer.lower() in answer.text.lower(),
        })
    if reference is not None:
        for row, ref in zip(rows, reference):
            row["kl"] = kl_divergence(ref["logits"], row["logits"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--tokens-per-frame", type=int, default=48)
    parser.add_argument("--budget", type=int, default=768, help="stream tokens per layer for every rule")
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default=None, help="a probed policy.json for the same model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    adapter = load_adapter(None, device=args.device, tokens_per_frame=args.tokens_per_frame)
    stream = text_stream(args.frames, seed=args.seed)
    questions = stream.questions
    device = str(adapter.device)

    def run(rule):
        start = time.perf_counter()
        session = StreamingSession(adapter, rule, chunk_frames=args.chunk)
        session.add_frames(stream.frames)
        ingest = time.perf_counter() - start
        return session, ingest

    full_session, full_ingest = run(FullRetention())
    reference = evaluate(full_session, questions)
    table = [{"rule": "full (reference)", "kept": full_session.tokens_kept[0], "ingest_s": full_ingest,
              "kl": 0.0, "answer_logprob": sum(r["answer_logprob"] for r in reference) / len(reference),
              "accuracy": sum(r["correct"] for r in reference) / len(reference), "rows": reference}]
    for name, rule in rules(adapter, args.budget, args.policy).items():
        session, ingest = run(rule)
        rows = evaluate(session, questions, reference)
        table.append({
            "rule": name,
            "kept": max(session.tokens_kept),
            "ingest_s": ingest,
            "kl": sum(r["kl"] for r in rows) / len(rows),
            "answer_logprob": sum(r["answer_logprob"] for r in rows) / len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "rows": rows,
        })
        print(f"{name:24s} KL {table[-1]['kl']:.4f}  logp {table[-1]['answer_logprob']:.3f}  "
              f"acc {table[-1]['accuracy']:.2f}  ingest {ingest:.1f}s", flush=True)

    stamp = datetime.now(timezone.utc)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    meta = {
        "command": command,
        "device": device if device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                                                  f"{torch.get_num_threads()} threads)",
        "date": stamp.isoformat(timespec="seconds"),
        "model": adapter.name_or_path,
        "frames": args.frames,
        "tokens_per_frame": args.tokens_per_frame,
        "stream_tokens": args.frames * args.tokens_per_frame,
        "budget": args.budget,
        "chunk": args.chunk,
        "questions": len(questions),
        "policy": args.policy,
    }
    for entry in table:
        for row in entry["rows"]:
            row.pop("logits")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"retention-fidelity-{device.split(':')[0]}-{stamp:%Y-%m-%d}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": table}, indent=2) + "\n")
    lines = [
        f"# Retention fidelity: {meta['model']}",
        "",
        f"`{command}` on {meta['device']}, {meta['date']}. {args.frames} text frames x "
        f"{args.tokens_per_frame} tokens = {meta['stream_tokens']} stream tokens; budget {args.budget} "
        f"per layer; {len(questions)} planted-fact questions asked at the end of the stream.",
        "",
        "| rule | kept/layer | KL(full ‖ rule) nats | mean log p(answer) | greedy contains answer |",
        "|---|---|---|---|---|",
    ]
    for entry in table:
        lines.append(f"| {entry['rule']} | {entry['kept']} | {entry['kl']:.4f} | "
                     f"{entry['answer_logprob']:.3f} | {entry['accuracy']:.2f} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
