#!/usr/bin/env bash
# The efficiency bench of two commits in one run on one GPU, alternating (A B A B), so a
# change that should not move the figures can be checked against run-to-run noise.
#
#   bash benchmarks/compare_commits.sh BEFORE AFTER [OUT]      # e.g. 65617aa HEAD
#
# Each commit is exported (git archive) to $OUT/trees/<commit>, imported from there
# (PYTHONPATH, the hermes_cli package linked to cli/), and benched on the LLaVA-OV-7B shape ($SHAPES)
# with chunks of 8 and the fifo and hermes rules at 16, 64 and 256 frames; extra bench
# options go in $BENCH_ARGS (e.g. "--tokenizer .cache/bpe-tokenizer" where the embedded
# model is not installed). Logs and results JSON land in $OUT/<round>-<commit>/.
set -euo pipefail
before=${1:?usage: compare_commits.sh BEFORE AFTER [OUT]}
after=${2:?usage: compare_commits.sh BEFORE AFTER [OUT]}
out=$(realpath -m "${3:-compare-out}")
root=$(git rev-parse --show-toplevel)
mkdir -p "$out/trees"
for commit in "$before" "$after"; do
  tree="$out/trees/$commit"
  if [ ! -d "$tree" ]; then
    mkdir -p "$tree" && git -C "$root" archive "$commit" | tar -x -C "$tree"
    ln -sfn cli "$tree/hermes_cli"
  fi
done
for round in 1 2; do
  for commit in "$before" "$after"; do
    dest="$out/$round-$commit"
    mkdir -p "$dest"
    (cd "$out/trees/$commit" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" benchmarks/efficiency.py \
        --shapes "${SHAPES:-llava-ov-7b}" --chunks 8 --rules fifo,hermes --frames 16,64,256 --questions 3 --no-check \
        ${BENCH_ARGS:-} --out-dir "$dest" > "$dest/bench.log" 2>&1) || echo "round $round, $commit: failed (see $dest/bench.log)"
    echo "== round $round, $commit"
    grep "^llava-ov-7b " "$dest/bench.log" || true
  done
done
