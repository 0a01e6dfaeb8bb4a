"""Writes ``01_probe_walkthrough.ipynb`` (without outputs) next to this file.

Run ``.venv/bin/python notebooks/build_walkthrough.py`` after editing the cells below; the
notebook is generated so that it stays reviewable and never carries outputs into git.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).with_name("01_probe_walkthrough.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Probing a model's memory tiers: a walkthrough

HERMES (METHOD.md, section 2) reads a model's attention over a stream the way the paper's
Figure 2 does: per layer, how much attention a question puts on each cached stream token,
as a function of its distance from the newest token, averaged over many questions and shown
on a log scale. In the paper's LLaVA-OneVision:

- **shallow layers** attend mostly to the newest tokens (recency: *sensory memory*);
- **deep layers** show no recency but sparse, rhythmic peaks exactly one frame
  (N tokens) apart, on per-frame *anchor tokens* (*long-term memory*);
- **middle layers** sit in between (*working memory*).

This notebook runs a small probe on the embedded SmolLM2 (a text model, fed a synthetic
stream of 48-token text "frames"), redoes the analysis from the saved profile without the
model, shows the figures and loads the policy the probe wrote. It runs on a CPU in about a
minute."""),
    ("code", """\
# Parameters (the tests override them through the environment)
import os
import tempfile
from pathlib import Path

FRAMES = int(os.environ.get("HERMES_NOTEBOOK_FRAMES", "40"))  # frames of the synthetic stream
TOKENS_PER_FRAME = 48  # the frame period N of this probe
OUT = Path(os.environ.get("HERMES_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="hermes-walkthrough-"))
print(f"{FRAMES} frames of {TOKENS_PER_FRAME} tokens; outputs go to {OUT}")"""),
    ("code", """\
%matplotlib inline
import numpy as np

from hermes_policy.models import load_adapter
from hermes_policy.policy import Policy
from hermes_probe import figures
from hermes_probe.heads import analyze_heads
from hermes_probe.metrics import compute_metrics
from hermes_probe.profiles import AttentionProfile
from hermes_probe.report import findings
from hermes_probe.runner import ProbeConfig, analyze
from hermes_probe.sources import synthetic_streams
from hermes_probe.tiers import best_contiguous_split, role_scores"""),
    ("md", """\
## 1. Load the model and probe it

`load_adapter(None, ...)` loads the SmolLM2-135M-Instruct that ships with the project.
`analyze` streams the synthetic input through a FIFO cache (the paper's protocol, with the
window scaled down to fit this short stream), asks the probe questions once the cache is
full, accumulates the attention statistics and writes `profiles.npz`, `metrics.json`,
`report.md`, `figures/` and `policy.json` into the output folder."""),
    ("code", """\
adapter = load_adapter(None, device="cpu", tokens_per_frame=TOKENS_PER_FRAME)
print(f"{adapter.name_or_path}: {adapter.num_layers} layers, {adapter.num_heads} heads, "
      f"{adapter.tokens_per_frame} tokens per frame")"""),
    ("code", """\
result = analyze(adapter, synthetic_streams(adapter, FRAMES), ProbeConfig(), OUT, force=True,
                 progress=False)
print(f"{result.profile.probes} probe queries, window {result.profile.window} tokens")
for path in sorted(OUT.rglob("*")):
    if path.is_file():
        print("wrote", path.relative_to(OUT))"""),
    ("md", """\
## 2. Redo the analysis from the saved profile, without the model

The profile holds running sums only (attention by distance and by in-frame offset, per
layer and head), so every measurement, the tier fit and the figures can be recomputed from
`profiles.npz` alone, e.g. on another machine or after changing the analysis
(`hermes-probe analyze --from-profiles` does the same from the command line)."""),
    ("code", """\
profile = AttentionProfile.load(OUT / "profiles.npz")
metrics = compute_metrics(profile)
fit = best_contiguous_split(role_scores(metrics))

assert np.allclose(fit.scores, result.fit.scores) and fit.tiers == result.fit.tiers
print(f"{profile.num_layers} layers x {profile.num_heads} heads, frame period N = {profile.period} "
      f"tokens, window {profile.window} tokens, {profile.probes} probes: same result as the run")"""),
    ("md", """\
## 3. Findings

The same statements as in `report.md`, from the recomputed measurements."""),
    ("code", """\
for line in findings(metrics, fit):
    print("-", line)"""),
    ("md", """\
## 4. Attention by distance (the paper's Figure 2)

One panel per representative layer (first, middle, last, and the most typical layer of
each fitted tier). Light vertical lines mark every frame of N tokens; grey steps are the
mean per frame, the dashed line a uniform spread.

**What to look for:** a recency layer falls steeply from the left edge (the newest tokens)
and its grey steps slope down; an anchor layer stays flat on average but spikes once per
frame, **exactly N tokens apart**, the spikes sitting at the same place relative to the
frame lines. A layer with both is mixing roles."""),
    ("code", "figures.plot_distance_profiles(profile, fit=fit)"),
    ("md", """\
## 5. Every layer at once

Rows are layers (layer 0 on top), columns distances; bright is more attention (log
scale; the marker on the colour bar is a uniform spread). Recency is a bright left edge;
anchors are thin vertical stripes repeating every N tokens. Grey cells were never
measured (beyond the window)."""),
    ("code", "figures.plot_distance_heatmap(profile)"),
    ("md", """\
## 6. Measurements per layer and where contiguous tiers do not fit

The paper splits the layers into three contiguous tiers. The probe scores each layer's own
role, `u` from 0 (pure recency) to 1 (pure anchors), fits the best contiguous split
(shaded, dashed fitted levels) and reports its R². **Ringed layers** act in a role other
than the tier they were put in; the strip below compares tier and own role layer by layer.
A low R² or many rings means this model is not ordered like the paper's; the per-layer
policy entries follow each layer's own measurements."""),
    ("code", "figures.plot_layer_metrics(metrics, fit)"),
    ("code", """\
print(f"R^2 of the contiguous fit: {fit.r2:.2f}")
print("layer  tier       own role   u      recency  periodicity")
for i in fit.mismatches:
    print(f"{i:5d}  {fit.tier_of_layer[i]:9s}  {fit.roles[i]:9s}  {fit.scores[i]:.2f}   "
          f"{metrics.recency_share[i]:.2f}     {metrics.periodicity[i]:.2f}")"""),
    ("md", """\
## 7. Which heads carry the rhythm

Periodicity per head: the share of the detrended log-attention that repeats every frame
(0 = no rhythm, 1 = pure rhythm). The bars on the right are the layer's own value (from the
head-averaged profile). Anchor behaviour is often carried by a few heads only."""),
    ("code", "figures.plot_head_periodicity(metrics)"),
    ("md", """\
## 8. Where in a frame the anchors sit

Attention per token at each offset within a frame, relative to the layer's mean (1 = no
preferred position; stars mark the most attended offset). Anchor layers peak at the same
offset in every frame, so one offset stands out across many deep rows of the heatmap; with
text frames, look at the first and last offsets (the frame boundaries)."""),
    ("code", "figures.plot_phase_profiles(profile, fit=fit)"),
    ("md", """\
## 9. Each KV head's role

The same measurements per KV head (the query heads of each grouped-query group averaged):
each head labelled streaming (recency), anchor (per-frame offsets) or retrieval (neither),
shaded by the label's confidence, beside the share of its attention the newest budget's
tokens would keep ([docs/heads.md](../docs/heads.md))."""),
    ("code", """\
policy = Policy.load(OUT / "policy.json")
head_metrics, roles = analyze_heads(profile, policy.model, policy.budget)
figures.plot_head_roles(head_metrics, roles)"""),
    ("md", """\
## 10. The policy the probe wrote

`policy.json` is what the streaming runtime loads: the contiguous tiers plus per-layer
retention parameters derived from each layer's own measurements (recency weight
`w = 1 - u`, forgetting rate from the measured decay, smoothing `0.1 + 0.3 u`)."""),
    ("code", """\
print(f"{policy.model.name_or_path}: budget {policy.budget} stream tokens per layer")
print("tiers:", {name: tuple(span) for name, span in policy.tiers.items()})
print("layer  tier       w     k      lambda  summary")
for layer in policy.layers:
    print(f"{layer.index:5d}  {layer.tier:9s}  {layer.recency_weight:.2f}  {layer.forgetting_rate:5.1f}  "
          f"{layer.smoothing:.2f}    {layer.summary_token}")"""),
]


def build() -> nbformat.NotebookNode:
    cells = []
    for index, (kind, source) in enumerate(CELLS):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(source, id=f"walkthrough-{index:02d}")
        if index == 1:
            cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.validate(notebook)
    return notebook


def main() -> Path:
    nbformat.write(build(), NOTEBOOK)
    return NOTEBOOK


if __name__ == "__main__":
    print(f"wrote {main()}")
