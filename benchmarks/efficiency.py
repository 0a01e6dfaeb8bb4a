"""GPU efficiency benchmark: TTFT, TPOT, peak memory and ingest speed against the floor.

The same as ``hermes-probe bench`` (see ``hermes_cli.bench_command`` and the README)::

    python benchmarks/efficiency.py --shapes llava-ov-7b --append
    python benchmarks/efficiency.py --shapes qwen2.5-vl-7b --append
    python benchmarks/efficiency.py --report-only benchmarks/results/efficiency-<device>-<date>.json
"""

from __future__ import annotations

import sys

from hermes_cli.main import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="hermes-probe")
