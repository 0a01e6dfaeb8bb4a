"""`torchrun --nproc-per-node 2 ... eval` on CPU (gloo) answers exactly like one process.

The model is ``random:tiny-llava-ov`` (built in every process from a seed, as the GPU run
builds ``random:llava-ov-7b``), so the test also covers random-weight shapes by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hermes_policy.evaluation import evaluate
from hermes_policy.evaluation.results import RESULTS_FILE, read_records
from hermes_policy.inputs.annotations import load_annotations
from hermes_policy.inputs.synthetic_benchmark import write_synthetic_benchmark
from hermes_policy.models import load_adapter

TORCHRUN = Path(sys.executable).parent / "torchrun"
LIMIT = 20  # 3 videos of 8 questions: rank 0 streams videos 0 and 2 (8 + 4), rank 1 video 1


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"no torchrun beside {sys.executable}")
def test_two_gloo_processes_answer_like_one(tmp_path):
    model = "random:tiny-llava-ov"
    bench = write_synthetic_benchmark(tmp_path / "bench", num_videos=3, num_frames=6, fps=1.0, height=64, width=64)
    out2 = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launched = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "hermes_cli.main", "eval",
         "--model", model, "--annotations", str(bench), "--out", str(out2), "--limit", str(LIMIT),
         "--budget", "40", "--fps", "1", "--chunk", "2", "--mc-max-new-tokens", "2", "--device", "cpu",
         "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    # Meanwhile, the same benchmark in this one process (one thread, as each torchrun worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapter = load_adapter(model, device="cpu", dtype=torch.float32)
        one = evaluate(adapter, "paper-default", load_annotations(bench), tmp_path / "one", budget=40, fps=1.0,
                       chunk_frames=2, mc_max_new_tokens=2, limit=LIMIT, progress=False)
    finally:
        torch.set_num_threads(threads)
    output, _ = launched.communicate(timeout=600)
    assert launched.returncode == 0, output

    two = read_records(out2 / RESULTS_FILE)
    assert len(two) == len(one.records) == LIMIT
    key = lambda r: (r["video_id"], r["question_index"])  # noqa: E731
    assert [key(r) for r in two] == [key(r) for r in one.records]  # merged in benchmark order
    assert [r["prediction"] for r in two] == [r["prediction"] for r in one.records]
    assert [r["frames_seen"] for r in two] == [r["frames_seen"] for r in one.records]
    assert not list(out2.glob("shards/*.jsonl"))  # folded into results.jsonl by rank 0
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["config"]["world_size"] == 2 and summary["answered"] == LIMIT
    assert summary["correct"] == one.summary["correct"] and summary["failed_videos"] == []
    assert output.count("answered 20 of 20 questions") == 1  # only rank 0 reports
