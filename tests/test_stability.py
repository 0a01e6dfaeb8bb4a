"""Bootstrap stability of per-layer roles on hand-made profiles of several streams."""

from __future__ import annotations

import math

import numpy as np

from hermes_probe.profiles import AttentionProfile
from hermes_probe.stability import bootstrap, uncertain_lines

WINDOW, PERIOD, LAYERS = 128, 16, 6


def pattern(kind: str) -> np.ndarray:
    d = np.arange(WINDOW)
    if kind == "recency":
        a = np.exp(-0.15 * d)
    elif kind == "anchor":
        a = np.where(d % PERIOD == 5, math.exp(4.0), 1.0)
    else:
        a = np.exp(-0.01 * d) * np.where(d % PERIOD == 5, math.exp(1.5), 1.0)
    return a / a.sum()


def stream_profile(kinds: list[str]) -> AttentionProfile:
    profile = AttentionProfile(num_layers=LAYERS, num_heads=2, max_distance=WINDOW, period=PERIOD)
    profile.probes = 4
    for layer, kind in enumerate(kinds):
        for head in range(2):
            profile.distance_sum[layer, head] = 4 * pattern(kind)
    profile.distance_count[:] = 4
    profile.phase_count[:] = 1
    profile.phase_sum[:] = 1.0
    for layer, kind in enumerate(kinds):
        if kind != "recency":
            profile.phase_sum[layer, :, 5] = 9.0
    return profile


PLANTED = ["recency", "recency", "mixed", "mixed", "anchor", "anchor"]


def test_identical_streams_leave_no_layer_uncertain():
    result = bootstrap([stream_profile(PLANTED) for _ in range(4)], resamples=30)
    assert result.uncertain == []
    assert np.allclose(result.low, result.high)
    assert result.tier[0] == "sensory" and result.tier[-1] == "long_term"
    assert "every layer keeps" in uncertain_lines(result.to_dict())[0]


def test_a_layer_that_changes_role_between_streams_is_flagged():
    flipped = list(PLANTED)
    flipped[2] = "anchor"  # layer 2 is mixed in two streams, an anchor layer in two others
    result = bootstrap([stream_profile(PLANTED), stream_profile(PLANTED), stream_profile(flipped),
                        stream_profile(flipped)], resamples=60)
    assert 2 in result.uncertain
    assert 0 not in result.uncertain and 5 not in result.uncertain
    assert result.high[2] - result.low[2] > 0.02 > result.high[0] - result.low[0]
    lines = uncertain_lines(result.to_dict())
    assert any(line.strip().startswith("layer 2:") for line in lines)


def test_the_report_gets_one_stability_section_naming_the_uncertain_layers(tmp_path):
    from hermes_cli.main import app
    from typer.testing import CliRunner

    from hermes_probe.report import STABILITY_HEADING

    flipped = list(PLANTED)
    flipped[2] = "anchor"
    paths = []
    for i, kinds in enumerate([PLANTED, PLANTED, flipped, flipped]):
        paths.append(tmp_path / f"s{i}.npz")
        stream_profile(kinds).save(paths[-1])
    report = tmp_path / "report.md"
    report.write_text("# hermes-probe report: m\n\n## Findings\n\n- something\n")
    runner = CliRunner()
    args = ["stability", *map(str, paths), "--out", str(tmp_path / "st.json"), "--resamples", "40",
            "--report", str(report)]
    for _ in range(2):  # a second run replaces the section instead of adding another
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    text = report.read_text()
    assert text.startswith("# hermes-probe report: m\n\n## Findings\n\n- something\n\n")
    assert text.count(STABILITY_HEADING) == 1
    section = text.split(STABILITY_HEADING)[1]
    assert "uncertain layers" in section and "\n| 2 |" in section and "\n| 0 |" not in section
    missing = runner.invoke(app, [*args[:-1], str(tmp_path / "none.md")])
    assert missing.exit_code == 1 and "report not found" in missing.output
