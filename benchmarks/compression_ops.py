"""Operators a steady-state compressing chunk dispatches, by phase (any device, no GPU needed).

On a GPU every operator that is not a view is at least one kernel, launched from Python
unless it runs inside a replayed CUDA graph; launches, not arithmetic, set the pace of the
scoring and gathering steps (hundreds of kernels of a few microseconds each) and of a
decoder layer's element-wise steps. This script counts them on a 28-layer tiny Llama (the
LLaVA-OV-7B / Qwen2.5-VL-7B layer count; the counts do not depend on widths) under the
``hermes`` paper-default policy, at its steady state:

- ``select`` and ``gather``: the compression step (scoring with summary tokens, eviction);
- ``decoder``: one compressing chunk's fixed-buffer forward (the body an ingest CUDA graph
  captures, run here without capture), with the fewer-kernel forward and with the
  transformers layers.

Operators inside a fused op (:mod:`hermes_policy.kernels.fusion`) run eagerly here but compile into
one kernel on CUDA; they are counted apart, so ``launches on CUDA = operators - inside fused
+ fused calls``. The decoder's operators inside the attention function are counted apart
too: on the CPU it runs explicit or masked paths where CUDA runs one fused kernel (flash,
cuDNN), so only the count outside attention stands for the GPU.

    python benchmarks/compression_ops.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class OperatorCount(TorchDispatchMode):
    """Counts non-view aten operators, and those dispatched inside fused ops."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.inside_fused = 0
        self.fused_calls = 0
        self.fused_depth = 0
        self.inside_attention = 0
        self.attention_depth = 0
        self.outside_attention_launches = 0  # as on CUDA: a fused op one launch
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False):
            self.total += 1
            if self.attention_depth:
                self.inside_attention += 1
            else:
                self.names[func.name()] += 1
                self.outside_attention_launches += not self.fused_depth
            if self.fused_depth:
                self.inside_fused += 1
        return func(*args, **(kwargs or {}))

    def launches_on_cuda(self) -> int:
        return self.total - self.inside_fused + self.fused_calls


@contextmanager
def counting_fused_calls(counter: OperatorCount) -> Iterator[None]:
    """Mark the operators dispatched inside :class:`~hermes_policy.kernels.fusion.FusedOp` calls."""
    try:
        from hermes_policy.kernels.fusion import FusedOp
    except ImportError:  # older trees: the class lived in fused_ops
        from hermes_policy.kernels.fused_ops import FusedOp
    original = FusedOp.__call__

    def call(self, *args):
        counter.fused_calls += 1
        counter.outside_attention_launches += not counter.attention_depth and not counter.fused_depth
        counter.fused_depth += 1
        try:
            return original(self, *args)
        finally:
            counter.fused_depth -= 1

    FusedOp.__call__ = call
    try:
        yield
    finally:
        FusedOp.__call__ = original


@contextmanager
def counting_attention(counter: OperatorCount) -> Iterator[None]:
    """Mark the operators dispatched inside the ragged attention function: on the CPU it
    takes explicit or masked paths where CUDA runs single fused kernels (flash, cuDNN), so
    its counts say nothing about launches on a GPU and are reported apart."""
    from transformers import AttentionInterface

    from hermes_policy.attention import dispatch as attention
    from hermes_policy.graphs import static_forward

    original = attention.ragged_attention

    def wrapped(*args, **kwargs):
        counter.attention_depth += 1
        try:
            return original(*args, **kwargs)
        finally:
            counter.attention_depth -= 1

    AttentionInterface.register(attention.ATTENTION_NAME, wrapped)
    had = hasattr(static_forward, "ragged_attention")
    if had:
        static_forward.ragged_attention = wrapped
    try:
        yield
    finally:
        AttentionInterface.register(attention.ATTENTION_NAME, original)
        if had:
            static_forward.ragged_attention = original


def build_session(folder: Path, tokens_per_frame: int, budget: int, chunk: int):
    from hermes_policy import StreamingSession
    from hermes_policy.models import load_adapter
    from hermes_policy.options import RuntimeOptions
    from hermes_policy.policy import ModelInfo, paper_default
    from hermes_policy.retention import HermesRetention

    adapter = load_adapter(folder, device="cpu", tokens_per_frame=tokens_per_frame)
    rule = HermesRetention(policy=paper_default(ModelInfo.of(adapter), budget=budget))
    return adapter, StreamingSession(adapter, rule, chunk_frames=chunk, options=RuntimeOptions.from_env(answer_path="static", ingest_graphs=False))


def phase_counts(session, frames: torch.Tensor, chunks: int) -> dict[str, float]:
    """Operators per compressing chunk in each of the session's phases (mean of ``chunks``)."""
    from hermes_policy.session import NoObserver

    counters: dict[str, OperatorCount] = collections.defaultdict(OperatorCount)

    class CountingObserver:  # counts the operators each phase dispatches
        @contextmanager
        def phase(self, name: str):
            counter = counters[name]
            with counting_fused_calls(counter), counter:
                yield

    session.observer = CountingObserver()
    try:
        for _ in range(chunks):
            session.add_frames(frames)
    finally:
        session.observer = NoObserver()
    out = {}
    for name in ("select", "gather"):
        c = counters[name]
        out[name] = {
            "operators": c.total / chunks,
            "inside_fused_ops": c.inside_fused / chunks,
            "fused_op_calls": c.fused_calls / chunks,
            "launches_on_cuda": c.launches_on_cuda() / chunks,
            "top": c.names.most_common(8),
        }
    return out


def decoder_counts(session, adapter, frames: torch.Tensor) -> dict[str, dict[str, float]]:
    """Operators of one compressing chunk's fixed-buffer forward, per decoder variant: the
    session's ``prefill`` phase counted by an observer (the forward and the few position
    operators around it; no method of the session or the graphs is patched)."""
    from hermes_policy.graphs.chunk_graphs import ChunkGraphs
    from hermes_policy.session import NoObserver

    out = {}
    lengths = session.store.lengths()
    for fewer in (True, False):
        graphs = ChunkGraphs(adapter, session.store, use_graphs=False, after=0, fewer_kernels=fewer)
        session.chunk_graphs = graphs
        counter = OperatorCount()

        class PrefillCounter:  # counts what the chunk forward dispatches, nothing else
            @contextmanager
            def phase(self, name: str, counter=counter):
                if name != "prefill":
                    yield
                    return
                with counting_fused_calls(counter), counting_attention(counter), counter:
                    yield

        session.observer = PrefillCounter()
        try:
            with torch.inference_mode():
                session.add_frames(frames)
        finally:
            session.observer = NoObserver()
        session.store.truncate(lengths)  # not needed for counting, but keeps runs alike
        name = "fewer kernels" if fewer else "transformers layers"
        outside = counter.total - counter.inside_attention
        out[name] = {
            "operators": counter.total,
            "inside_attention": counter.inside_attention,
            "outside_attention": outside,
            "outside_attention_launches_on_cuda": counter.outside_attention_launches,
            "inside_fused_ops": counter.inside_fused,
            "fused_op_calls": counter.fused_calls,
            "launches_on_cuda": counter.launches_on_cuda(),
            "top_outside_attention": counter.names.most_common(10),
        }
        session.chunk_graphs = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4, help="compressing chunks counted")
    parser.add_argument("--out", type=Path, default=None, help="folder for compression-ops-<date>.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from tiny_models import tiny_llama

    from hermes_policy.fileio.atomic import write_text_atomic

    tokens_per_frame = 8
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_llama(Path(tmp) / "model", layers=args.layers)
        adapter, session = build_session(folder, tokens_per_frame, args.budget, args.chunk)
        g = torch.Generator().manual_seed(0)
        stream = torch.randint(0, 200, (args.chunk, tokens_per_frame), generator=g)
        warm = -(-args.budget // (tokens_per_frame * args.chunk)) + 3
        for _ in range(warm):  # past the budget, into the steady state
            session.add_frames(stream)
        session.ask("What is happening?", max_new_tokens=2)  # the prompts now quote it
        session.add_frames(stream)
        phases = phase_counts(session, stream, args.chunks)
        decoder = decoder_counts(session, adapter, stream)
    package = Path(sys.modules["hermes_policy"].__file__).resolve().parent
    try:  # the commit of the tree the package was imported from (PYTHONPATH may point elsewhere)
        commit = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    command = "python " + " ".join(sys.argv)
    if package.parent != Path(__file__).resolve().parents[1]:  # another tree's package (a baseline)
        command = f"PYTHONPATH=<checkout of {commit}> {command}"
    result = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.machine()}), counts are device-independent",
        "commit": commit,
        "model": f"tiny Llama, {args.layers} layers; hermes paper-default, budget {args.budget}, chunks of {args.chunk} frames",
        "per_compressing_chunk": phases,
        "decoder_forward_of_a_compressing_chunk": decoder,
    }
    for name, entry in {**phases, **{f"decoder, {k}": v for k, v in decoder.items()}}.items():
        attention = (
            f"\n{'':32s}outside attention: {entry['outside_attention']} operators, "
            f"{entry['outside_attention_launches_on_cuda']} launches on CUDA (inside attention: {entry['inside_attention']})"
            if "inside_attention" in entry
            else ""
        )
        print(
            f"{name:30s} operators {entry['operators']:7.1f}  inside fused ops {entry['inside_fused_ops']:6.1f}  "
            f"fused calls {entry['fused_op_calls']:5.1f}  -> launches on CUDA {entry['launches_on_cuda']:7.1f}{attention}"
        )
    if args.out:
        # one file a day; runs of other commits (e.g. a baseline imported through
        # PYTHONPATH from a worktree) are kept side by side, the same commit's replaced
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"compression-ops-{result['date']}.json"
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        runs = [r for r in runs if r.get("commit") != commit] + [result]
        write_text_atomic(path, json.dumps({"runs": runs}, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
