# dlstack developer entry points. Every target builds .venv first when needed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENV ?= dev
PORT ?= 8080
EXAMPLE := .example/mnist-mlp

.PHONY: venv serve example test test-all lint image-test bench bench-render render render-diff up preview destroy cluster clean

# Set-up: a virtualenv with every pinned requirement and dlstack itself (editable).
$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

# A small example model (an MLP on 784 inputs), built at set-up time, never committed.
$(EXAMPLE)/model.yaml: $(BIN)/.installed
	$(BIN)/python -m services.example --out $(EXAMPLE)

example: $(EXAMPLE)/model.yaml

serve: example
	$(BIN)/dlstack serve $(EXAMPLE) --port $(PORT)

# The default suite: everything but the OCI image build (see image-test).
test: venv
	$(BIN)/pytest -q -m "not image" -n 2 --dist loadfile

lint: venv
	$(BIN)/ruff check services infra stacks tests
	$(BIN)/ruff format --check services infra stacks tests
	$(BIN)/mypy

# Builds the serving image with ../shared/tools/oci (buildah, no daemon), runs it, predicts.
image-test: venv
	$(BIN)/pytest -q -m image tests/test_image.py

bench: example
	$(BIN)/python -m tests.bench.server_bench

bench-render: venv
	$(BIN)/python -m tests.bench.render_bench

render: venv
	$(BIN)/dlstack render --stack $(ENV) --out build/render/$(ENV)

render-diff: venv
	$(BIN)/dlstack render-diff build/render/dev build/render/prod

# The real path: needs the pulumi CLI and a reachable cluster; fails fast otherwise.
up preview destroy: venv
	$(BIN)/python -m stacks.pulumi_cli $@ --stack $(ENV)

cluster:
	bash stacks/kind/create-cluster.sh

clean:
	rm -rf build .example .pytest_cache .mypy_cache .ruff_cache
