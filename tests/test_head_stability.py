"""Role agreement across runs: the modal role of each KV head and how often it was given."""

from __future__ import annotations

import numpy as np
import pytest

from hermes_probe.heads import role_agreement


def test_modal_role_and_agreement_share() -> None:
    runs = [
        np.array([["streaming", "anchor"], ["retrieval", "retrieval"]]),
        np.array([["streaming", "retrieval"], ["retrieval", "anchor"]]),
        np.array([["streaming", "anchor"], ["anchor", "streaming"]]),
    ]
    modal, share = role_agreement(runs)
    assert modal.tolist() == [["streaming", "anchor"], ["retrieval", "retrieval"]]
    np.testing.assert_allclose(share, [[1.0, 2 / 3], [2 / 3, 1 / 3]])


def test_ties_go_to_the_first_role_and_empty_input_is_refused() -> None:
    modal, share = role_agreement([np.array([["anchor"]]), np.array([["streaming"]])])
    assert modal.tolist() == [["streaming"]] and share.tolist() == [[0.5]]  # streaming before anchor
    with pytest.raises(ValueError, match="no runs"):
        role_agreement([])


def test_stability_script_reads_runs_and_writes_its_summary(tmp_path) -> None:
    """benchmarks/head_role_stability.py on two fabricated probe runs."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "head_role_stability.py"
    spec = importlib.util.spec_from_file_location("head_role_stability", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tables = [
        [("streaming", 0.9), ("anchor", 0.2), ("retrieval", 0.1), ("retrieval", 0.3)],
        [("streaming", 0.8), ("retrieval", 0.1), ("retrieval", 0.2), ("retrieval", 0.4)],
    ]
    runs = []
    for index, table in enumerate(tables):
        run = tmp_path / f"run{index}"
        run.mkdir()
        rows = [{"layer": i // 2, "kv_head": i % 2, "role": role, "confidence": c} for i, (role, c) in enumerate(table)]
        (run / "metrics.json").write_text(json.dumps({"kv_heads": rows}))
        runs.append(str(run))
    assert module.main([*runs, "--out", str(tmp_path / "summary")]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heads"] == 4 and summary["unanimous_share"] == 0.75
    assert summary["modal_roles"] == [["streaming", "retrieval"], ["retrieval", "retrieval"]]
    assert summary["unanimous_by_role"] == {"retrieval": 2, "streaming": 1, "anchor": 0}
    assert "| 0 | 0.75 | streaming, retrieval |" in (tmp_path / "summary.md").read_text()
    assert module.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
