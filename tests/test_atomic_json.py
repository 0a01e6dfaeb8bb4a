"""write_json_atomic: indented or compact, numpy values allowed, the same data either way."""

from __future__ import annotations

import json

import numpy as np

from hermes_policy.fileio.atomic import write_json_atomic


def test_compact_and_indented_hold_the_same_data(tmp_path):
    data = {"rows": [{"kl": np.float32(0.5), "values": np.arange(3)}], "name": "x"}
    indented = write_json_atomic(tmp_path / "a.json", data)
    compact = write_json_atomic(tmp_path / "b.json", data, indent=None)
    assert json.loads(indented.read_text()) == json.loads(compact.read_text()) == {
        "rows": [{"kl": 0.5, "values": [0, 1, 2]}], "name": "x"}
    assert "\n  " in indented.read_text()
    assert compact.read_text().count("\n") == 1 and ", " not in compact.read_text()
