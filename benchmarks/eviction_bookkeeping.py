"""Host time of the eviction's bookkeeping, each step two ways side by side.

After a compression step the host rewrites every layer's positions ``(axes, n)`` and frame
indices ``(n,)`` to the kept tokens (:meth:`hermes_policy.cache.kv_store.KVStore.keep_layers`),
after its one wait for the GPU and before the next chunk is queued, so the GPU waits for it.
This times that work for a LLaVA-OV-7B-like steady state (28 layers, a 4K budget plus a
chunk of 8 frames, 3 position axes): fancy indexing against ``np.take`` (and against the layers stacked, one
``np.take_along_axis`` for all: slower, not used); and, before it,
the hand-back of the downloaded indices (one staged array holding every layer's kept
indices and the summary tokens' positions, :class:`hermes_policy.cache.transfer.Download`) as a
torch split and view per member against numpy views of one array. Alternated in one run;
the ratios are saved.

    python benchmarks/eviction_bookkeeping.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def fancy(positions: np.ndarray, frames: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The form before: fancy indexing, then a contiguous copy of the positions."""
    return np.ascontiguousarray(positions[:, kept]), frames[kept]


def take(positions: np.ndarray, frames: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The form in KVStore.keep_layers."""
    return np.take(positions, kept, axis=1), np.take(frames, kept)


def stacked_rows(layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A form tried and not taken (2026-12-02): the layers stacked, one
    ``np.take_along_axis`` each for positions and frames, then a row per layer."""
    positions = np.stack([p for p, _, _ in layers])
    frames = np.stack([f for _, f, _ in layers])
    kept = np.stack([k for _, _, k in layers])
    new_positions = np.take_along_axis(positions, kept[:, None, :], axis=2)
    new_frames = np.take_along_axis(frames, kept, axis=1)
    return [(new_positions[i], new_frames[i]) for i in range(len(layers))]


def torch_views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The hand-back before (d561982): sizes by ``np.prod``, a torch split, then a view
    and ``.numpy()`` per member."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    return [part.view(shape).numpy() for part, shape in zip(flat.split(sizes), shapes, strict=True)]


def numpy_views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The form in Download.wait: numpy views of one numpy array."""
    array, start, out = flat.numpy(), 0, []
    for shape in shapes:
        size = math.prod(shape)
        out.append(array[start : start + size].reshape(shape))
        start += size
    return out


def median_ms(run: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def time_per_compression(
    form: Callable[..., tuple[np.ndarray, np.ndarray]], layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]], repeats: int
) -> float:
    """Median milliseconds to rewrite every layer once."""
    def once() -> None:
        for positions, frames, kept in layers:
            form(positions, frames, kept)

    return median_ms(once, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--budget", type=int, default=4000)
    parser.add_argument("--held", type=int, default=5600, help="tokens per layer before the compression")
    parser.add_argument("--axes", type=int, default=3)
    parser.add_argument("--summaries", type=int, default=8, help="layers with a summary token (its position comes back too)")
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
    shapes = [(len(kept),) for _, _, kept in layers] + [(args.axes, 1)] * args.summaries
    staged = torch.arange(sum(math.prod(shape) for shape in shapes))
    for a, b in zip(torch_views(staged, shapes), numpy_views(staged, shapes), strict=True):
        assert np.array_equal(a, b)
    for (a_pos, a_frames), (b_pos, b_frames) in zip(stacked_rows(layers), [take(*layer) for layer in layers], strict=True):
        assert np.array_equal(a_pos, b_pos) and np.array_equal(a_frames, b_frames)
    # alternated so that all see the same machine state
    before, after, stacked, split, views = [], [], [], [], []
    for _ in range(5):
        before.append(time_per_compression(fancy, layers, args.repeats))
        after.append(time_per_compression(take, layers, args.repeats))
        stacked.append(median_ms(lambda: stacked_rows(layers), args.repeats))
        split.append(median_ms(lambda: torch_views(staged, shapes), args.repeats))
        views.append(median_ms(lambda: numpy_views(staged, shapes), args.repeats))
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}), host work",
        "shape": f"{args.layers} layers, {args.axes} position axes, {args.held} -> {args.budget} tokens",
        "fancy_indexing_ms": statistics.median(before),
        "np_take_ms": statistics.median(after),
    }
    result["ratio"] = result["fancy_indexing_ms"] / result["np_take_ms"]
    result["stacked_take_along_axis_ms"] = statistics.median(stacked)
    result["download_members"] = len(shapes)
    result["download_torch_split_ms"] = statistics.median(split)
    result["download_numpy_views_ms"] = statistics.median(views)
    result["download_ratio"] = result["download_torch_split_ms"] / result["download_numpy_views_ms"]
    print(f"{result['shape']}: fancy indexing {result['fancy_indexing_ms']:.2f} ms, np.take {result['np_take_ms']:.2f} ms "
          f"a compression ({result['ratio']:.1f}x); layers stacked, np.take_along_axis {result['stacked_take_along_axis_ms']:.2f} ms")
    print(f"download hand-back of {len(shapes)} arrays: torch split and views {result['download_torch_split_ms']:.3f} ms, "
          f"numpy views {result['download_numpy_views_ms']:.3f} ms ({result['download_ratio']:.1f}x)")
    if args.out:
        from hermes_policy.fileio.atomic import write_text_atomic

        path = args.out / f"eviction-bookkeeping-{result['date']}.json"
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
