"""Host time of the eviction's bookkeeping: fancy indexing against ``np.take``, side by side.

After a compression step the host rewrites every layer's positions ``(axes, n)`` and frame
indices ``(n,)`` to the kept tokens (:meth:`hermes_policy.kv_store.KVStore.keep_layers`),
after its one wait for the GPU and before the next chunk is queued, so the GPU waits for it.
This times that work for a LLaVA-OV-7B-like steady state (28 layers, a 4K budget plus a
chunk of 8 frames, 3 position axes) both ways, in one run, and saves the ratio.

    python benchmarks/eviction_bookkeeping.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def fancy(positions: np.ndarray, frames: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The form before: fancy indexing, then a contiguous copy of the positions."""
    return np.ascontiguousarray(positions[:, kept]), frames[kept]


def take(positions: np.ndarray, frames: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The form in KVStore.keep_layers."""
    return np.take(positions, kept, axis=1), np.take(frames, kept)


def time_per_compression(
    form: Callable[..., tuple[np.ndarray, np.ndarray]], layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]], repeats: int
) -> float:
    """Median milliseconds to rewrite every layer once."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for positions, frames, kept in layers:
            form(positions, frames, kept)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--budget", type=int, default=4000)
    parser.add_argument("--held", type=int, default=5600, help="tokens per layer before the compression")
    parser.add_argument("--axes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="folder for eviction-bookkeeping-<date>.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(args.layers):
        positions = np.tile(np.arange(args.held, dtype=np.int64), (args.axes, 1))
        frames = np.arange(args.held, dtype=np.int64) // 196
        kept = np.sort(rng.choice(args.held, args.budget, replace=False))
        layers.append((positions, frames, kept))
    for a, b in zip(fancy(*layers[0]), take(*layers[0]), strict=True):  # the same result
        assert np.array_equal(a, b) and b.flags["C_CONTIGUOUS"]
    # alternated so that both see the same machine state
    before, after = [], []
    for _ in range(5):
        before.append(time_per_compression(fancy, layers, args.repeats))
        after.append(time_per_compression(take, layers, args.repeats))
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}), host work",
        "shape": f"{args.layers} layers, {args.axes} position axes, {args.held} -> {args.budget} tokens",
        "fancy_indexing_ms": statistics.median(before),
        "np_take_ms": statistics.median(after),
    }
    result["ratio"] = result["fancy_indexing_ms"] / result["np_take_ms"]
    print(f"{result['shape']}: fancy indexing {result['fancy_indexing_ms']:.2f} ms, np.take {result['np_take_ms']:.2f} ms "
          f"a compression ({result['ratio']:.1f}x)")
    if args.out:
        from hermes_policy.atomic import write_text_atomic

        path = args.out / f"eviction-bookkeeping-{result['date']}.json"
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
