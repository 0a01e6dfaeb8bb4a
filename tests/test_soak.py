"""benchmarks/soak.py's verdict: flat runs pass, any growth after warm-up fails with its reason."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MIB = 2**20
spec = importlib.util.spec_from_file_location("soak", Path(__file__).parent.parent / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(spec)
sys.modules["soak"] = soak  # dataclasses look their module up while the class is made
spec.loader.exec_module(soak)


def samples(rss=lambda i: 1000 * MIB, kv=lambda i: 40 * MIB, kept=lambda i: 512, position=lambda i: 2000):
    return [soak.Sample(frames=100 * i, seconds=float(i), rss_bytes=rss(i), kv_cache_bytes=kv(i),
                        tokens_kept_max=kept(i), max_position=position(i), compressions=i) for i in range(1, 41)]


def judge(run):
    return soak.verdict(run, warmup_frames=800, rss_tolerance=64 * MIB, max_positions=8192, budget_tokens=512)


def test_a_flat_run_passes_despite_allocator_noise():
    assert judge(samples(rss=lambda i: (1000 + 100 * (i % 2)) * MIB)) == []


def test_growth_after_warm_up_fails_with_the_reason():
    assert "RSS grew" in judge(samples(rss=lambda i: (1000 + 10 * i) * MIB))[0]
    assert "KV cache grew" in judge(samples(kv=lambda i: (40 + i) * MIB))[0]
    assert "positions reached" in judge(samples(position=lambda i: 300 * i))[0]
    assert "above its budget" in judge(samples(kept=lambda i: 600))[0]
    assert "too few samples" in judge(samples()[:8])[0]
