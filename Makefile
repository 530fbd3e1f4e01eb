# genlab — `make help` lists the targets.
PY ?= python
ARGS ?=

.PHONY: help install test test-all lint format train sample bench clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

install: ## install genlab with the dev and bench extras (editable)
	$(PY) -m pip install -e ".[dev,bench]"

test: ## fast test suite (what CI runs)
	$(PY) -m pytest -q

test-all: ## every test, including the slow ones on real data (../shared/assets)
	$(PY) -m pytest -q -m ""

lint: ## ruff lint and format check
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

format: ## ruff format and autofix
	$(PY) -m ruff format src tests bench
	$(PY) -m ruff check --fix src tests bench

train: ## train (default: DDPM on MNIST); pass overrides with ARGS="model=... data=..."
	$(PY) -m genlab $(ARGS)

sample: ## sample from a run: ARGS="run_dir=logs/train/runs/<run> n=64"
	$(PY) -m genlab.sample $(ARGS)

bench: ## training throughput vs diffusers and denoising-diffusion-pytorch
	$(PY) bench/train_throughput.py $(ARGS)

clean: ## remove caches and test outputs (not your runs in logs/)
	rm -rf .pytest_cache .ruff_cache src/*.egg-info
