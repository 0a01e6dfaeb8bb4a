"""The walkthrough notebook runs headless on the embedded SmolLM2 and shows what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from hermes_probe.figures import FIGURE_NAMES

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
WALKTHROUGH = NOTEBOOKS / "01_probe_walkthrough.ipynb"


def _outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")


def test_walkthrough_is_committed_without_outputs_and_matches_its_generator():
    generator = runpy.run_path(str(NOTEBOOKS / "build_walkthrough.py"))  # no bytecode left behind
    stored = nbformat.read(WALKTHROUGH, as_version=4)
    assert not _outputs(stored)
    assert all(cell.get("execution_count") is None for cell in stored.cells if cell.cell_type == "code")
    assert [c.source for c in stored.cells] == [c.source for c in generator["build"]().cells]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_walkthrough_runs_headless(tmp_path, monkeypatch):
    out = tmp_path / "out"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.setenv("HERMES_NOTEBOOK_FRAMES", "24")
    monkeypatch.setenv("HERMES_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    notebook = nbformat.read(WALKTHROUGH, as_version=4)

    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURE_NAMES) + 1  # and the KV heads' roles
    text = "\n".join(_text(o) for o in outputs)
    assert "24 frames of 48 tokens" in text  # the override reached the parameter cell
    assert "Best contiguous tiers:" in text and "Recency-biased layers" in text  # the findings
    assert "same result as the run" in text
    assert (out / "policy.json").is_file() and (out / "profiles.npz").is_file()
    assert len(list((out / "figures").glob("*.png"))) == len(images)
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written into the repo
    assert not any(workdir.iterdir())
