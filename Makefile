# dlstack developer entry points. Every target builds .venv first when needed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENV ?= dev
PORT ?= 8080
EXAMPLE := .example/mnist-mlp

# System packages (sudo only when not root): script/sysdeps says what and how.
.PHONY: sysdeps sysdeps-test fresh-check venv serve example test lint image-test bench bench-render render render-diff models-verify datasets-verify up preview destroy cluster clean

# Set-up: a virtualenv with every pinned requirement and dlstack itself (editable), step by step.
$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml script/venv
	PY=$(PY) script/venv

venv: $(BIN)/.installed

sysdeps:
	script/sysdeps serve

sysdeps-test:
	script/sysdeps test

# The example models (an MLP on 784 inputs, a small CNN), built at set-up time, never committed,
# and registered in the local model registry (.registry) as mnist-mlp:1 and tiny-cnn:1, which
# Pulumi.dev.yaml / Pulumi.prod.yaml refer to. Registering identical content is a no-op.
$(EXAMPLE)/model.yaml: $(BIN)/.installed
	@echo "==> example model mnist-mlp: build and register (.example/, .registry/)"
	$(BIN)/python -m services.example --out $(EXAMPLE) --model mnist-mlp
	$(BIN)/dlstack models register $(EXAMPLE) --name mnist-mlp --framework pytorch

.example/tiny-cnn/model.yaml: $(BIN)/.installed
	@echo "==> example model tiny-cnn: build and register"
	$(BIN)/python -m services.example --out .example/tiny-cnn --model tiny-cnn
	$(BIN)/dlstack models register .example/tiny-cnn --name tiny-cnn --framework pytorch

example: $(EXAMPLE)/model.yaml .example/tiny-cnn/model.yaml

serve: sysdeps example
	@echo "==> serving mnist-mlp on 0.0.0.0:$(PORT) (Ctrl-C stops; PORT=N make serve for another port)"
	$(BIN)/dlstack serve $(EXAMPLE) --port $(PORT)

# The default suite: everything but the OCI image build (see image-test).
test: sysdeps-test venv
	$(BIN)/pytest -q -m "not image" -n 2 --dist loadfile

lint: venv
	$(BIN)/ruff check services infra stacks tests
	$(BIN)/ruff format --check services infra stacks tests
	$(BIN)/mypy

# Builds the serving image with ../shared/tools/oci (buildah, no daemon), runs it, predicts.
image-test: venv
	$(BIN)/pytest -q -m image tests/test_image.py

bench: sysdeps-test example
	$(BIN)/python -m tests.bench.server_bench

bench-render: venv
	$(BIN)/python -m tests.bench.render_bench

render: example
	$(BIN)/dlstack render --stack $(ENV) --out build/render/$(ENV)

# What prod changes relative to dev, as the markdown a reviewer reads.
render-diff: example
	$(BIN)/dlstack render --stack dev --out build/render/dev
	$(BIN)/dlstack render --stack prod --out build/render/prod
	$(BIN)/dlstack render-diff build/render/dev build/render/prod

models-verify datasets-verify: venv
	$(BIN)/dlstack $(@:-verify=) verify

# The real path: needs the pulumi CLI and a reachable cluster; fails fast otherwise.
up preview destroy: venv
	$(BIN)/python -m stacks.pulumi_cli $@ --stack $(ENV)

cluster:
	bash stacks/kind/create-cluster.sh

clean:
	rm -rf build .example .pytest_cache .mypy_cache .ruff_cache

# Both README lines, verbatim, as root in a fresh bare Debian container (../shared/tools/oci); slow.
fresh-check:
	script/fresh-check
