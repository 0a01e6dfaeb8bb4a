"""Merge `hermes-probe fidelity` result files and render the committed markdown table.

Usage::

    python benchmarks/fidelity_report.py OUT.json PART1.json [PART2.json ...] --title "..."

Rows of all parts are concatenated (a cell present in two parts is an error), the first
part's manifest is kept with every part's manifest under ``parts``, the summary (means
and 95% intervals over seeds and questions) is recomputed, and ``OUT.md`` gets the
commands, date, machine and one table per budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
from hermes_probe.fidelity import (
    SCHEMA,
    label,
    markdown_table,
    paired_difference,
    row_key,
    summarise,
)

ORDER = ["full", "fifo", "sink-recent", "uniform", "attention-only", "window", "retrieval", "hermes (paper-default)",
         "hermes (heuristic)", "hermes (calibrated)", "hermes (calibrated-kl)", "hermes (calibrated-recall)",
         "hermes (calibrated-runtime)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("parts", type=Path, nargs="+")
    parser.add_argument("--title", default="Retention fidelity on held-out streams")
    parser.add_argument("--paired", default=None,
                        help="a label (e.g. 'hermes (calibrated-runtime)'): add its paired KL differences to the others")
    parser.add_argument("--complete-seeds-only", action="store_true",
                        help="drop seeds on which some (rule/policy, budget, task) cell is missing")
    args = parser.parse_args(argv)
    parts = [json.loads(p.read_text()) for p in args.parts]
    rows, seen = [], set()
    for part in parts:
        for row in part["rows"]:
            key = row_key(row)
            if key in seen:
                if row["rule"] == "full":  # every part recomputes the reference: keep the first
                    continue
                raise SystemExit(f"cell {key} is in two parts")
            seen.add(key)
            rows.append(row)
    if args.complete_seeds_only:
        cells = {(label(r), r["task"], r["budget"]) for r in rows}
        by_seed: dict[int, set] = {}
        for r in rows:
            by_seed.setdefault(r["seed"], set()).add((label(r), r["task"], r["budget"]))
        keep = {seed for seed, have in by_seed.items() if have == cells}
        dropped = sorted(set(by_seed) - keep)
        if dropped:
            print(f"dropping incomplete seeds {dropped}", file=sys.stderr)
        rows = [r for r in rows if r["seed"] in keep]
    manifest = dict(parts[0]["manifest"])
    manifest["parts"] = [p["manifest"] for p in parts]
    summary = summarise(rows)
    write_json_atomic(args.out.with_suffix(".json"), {"schema": SCHEMA, "manifest": manifest, "rows": rows,
                                                      "summary": summary}, indent=None)
    labels = sorted({label(r) for r in rows}, key=lambda n: ORDER.index(n) if n in ORDER else 99)
    lines = [f"# {args.title}", ""]
    for part in parts:
        m = part["manifest"]
        lines.append(f"- `{m['command']}` — {m['date']}, {m['device']}, torch {m['packages']['torch']}, "
                     f"transformers {m['packages']['transformers']}")
    m = manifest
    seeds = sorted({r["seed"] for r in rows})
    lines += ["", f"Model {m['model']} ({m['dtype']}), {m['frames']} frames x {m['tokens_per_frame']} tokens = "
              f"{m['stream_tokens']} stream tokens, chunks of {m['chunk_frames']} frames, budgets {m['budgets']} "
              f"stream tokens per layer, held-out seeds {seeds}. Rules and policies: {', '.join(labels)}.", "",
              "Accuracy: copy = share of the 16 copied tokens that are the model's top-1 (teacher-forced); kv = "
              "exact value; facts = multiple choice (the code word: exact). log p = summed log-probability of the "
              "answer's tokens; KL(full ‖ rule) at the answer positions, nats, mean over positions. Brackets: 95% "
              "bootstrap intervals over seeds and questions. Tasks on which the full cache is below 70% are "
              "flagged uninformative.", ""]
    lines += ["## Mean KL over tasks (each task's mean counts once)", "",
              "| budget | rule / policy | KL all tasks | KL informative tasks | copy accuracy | facts accuracy |",
              "|---|---|---|---|---|---|"]
    budgets = sorted({e["budget"] for e in summary if e["budget"] is not None})
    for budget in budgets:
        for name in labels:
            if name == "full":
                continue
            cells = {e["task"]: e for e in summary if e["label"] == name and e["budget"] == budget}
            if not cells:
                continue
            kl_all = sum(e["kl"]["mean"] for e in cells.values()) / len(cells)
            informative = [e["kl"]["mean"] for e in cells.values() if e["informative"]]
            kl_inf = sum(informative) / len(informative) if informative else float("nan")
            acc = {t: (f"{cells[t]['accuracy']['mean']:.3f}" if t in cells else "-") for t in ("copy", "facts")}
            lines.append(f"| {budget} | {name} | {kl_all:.3f} | {kl_inf:.3f} | {acc['copy']} | {acc['facts']} |")
    paired = []
    if args.paired:
        informative = sorted({e["task"] for e in summary if e["informative"]})
        every = sorted({e["task"] for e in summary})
        lines += ["", f"## Paired KL differences: {args.paired} minus each other rule", "",
                  "Per seed, the mean over tasks of the per-probe KL difference on the same probes; mean over "
                  "seeds with a 95% bootstrap interval over seeds, and on how many seeds it is lower. Negative: "
                  f"{args.paired} is closer to the full cache.", "",
                  "| budget | tasks | minus | KL difference [95% CI] | lower on seeds |", "|---|---|---|---|---|"]
        for budget in budgets:
            for tasks, name in ((informative, "informative"), (every, "all")):
                for other in labels:
                    if other in ("full", args.paired):
                        continue
                    d = paired_difference(rows, args.paired, other, budget, tasks)
                    paired.append(d)
                    lines.append(f"| {budget} | {name} | {other} | {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] "
                                 f"| {d['a_lower_on']}/{d['seeds']} |")
        write_json_atomic(args.out.with_suffix(".json"), {"schema": SCHEMA, "manifest": manifest, "rows": rows,
                                                          "summary": summary, "paired": paired}, indent=None)
    lines += ["", "## Per task", "", markdown_table(summary, ORDER)]
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
