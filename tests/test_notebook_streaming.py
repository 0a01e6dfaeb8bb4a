"""The streaming-policy notebook runs headless on the embedded SmolLM2 and shows what it promises."""

from __future__ import annotations

import csv
import runpy
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
STREAMING = NOTEBOOKS / "02_streaming_policy.ipynb"
RULES = ["full", "fifo", "sink+recent", "uniform", "attention-only", "hermes"]


def _outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return data.get("text/plain", "") + data.get("text/html", "")


def test_streaming_notebook_is_committed_without_outputs_and_matches_its_generator():
    generator = runpy.run_path(str(NOTEBOOKS / "build_streaming.py"))
    stored = nbformat.read(STREAMING, as_version=4)
    assert not _outputs(stored)
    assert all(cell.get("execution_count") is None for cell in stored.cells if cell.cell_type == "code")
    assert [c.source for c in stored.cells] == [c.source for c in generator["build"]().cells]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_streaming_notebook_runs_headless(tmp_path, monkeypatch):
    from hermes_policy.policy import ModelInfo, paper_default

    out = tmp_path / "out"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    # A "probed" policy for the embedded SmolLM2 at 48 tokens per frame, with layer-dependent
    # budgets: the notebook must rescale it to its own budget and add it as a seventh rule.
    smollm2 = ModelInfo("SmolLM2-135M-Instruct", "LlamaForCausalLM", 30, 9, 3, 48)
    policy_path = paper_default(smollm2, budget=2000, budget_weights=[1.0] * 15 + [2.0] * 15).save(
        tmp_path / "policy.json"
    )
    monkeypatch.setenv("HERMES_NOTEBOOK_FRAMES", "12")
    monkeypatch.setenv("HERMES_NOTEBOOK_POLICY", str(policy_path))
    monkeypatch.setenv("HERMES_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # One intra-op thread: barely slower for a 135M model on short pieces, and immune to the
    # spin-waiting that makes two OpenMP threads crawl when other processes share the cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    notebook = nbformat.read(STREAMING, as_version=4)

    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # rules at the end of the stream, hermes over time
    text = "\n".join(_text(o) for o in outputs)
    assert "12 frames of 48 tokens" in text and "budget 192 tokens per layer" in text
    assert "probed policy from" in text
    for rule in [*RULES, "hermes (probed)"]:
        assert f"{rule} " in text  # streamed, and in the tables
    assert "KL vs full" in text and "log p(answer)" in text

    with (out / "answers.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["rule"] for row in rows} == {*RULES, "hermes (probed)"}
    assert len(rows) % 7 == 0 and len(rows) >= 7 * 4
    full = [row for row in rows if row["rule"] == "full"]
    assert all(float(row["KL vs full"]) == pytest.approx(0.0, abs=1e-6) for row in full)
    assert all(float(row["log p(answer)"]) < 0 for row in rows)
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["hermes_over_time.png", "kept_frames.png"]
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written into the repo
    assert not any(workdir.iterdir())
