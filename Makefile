# qacc: `make demo` runs the main job end to end in a few minutes, `make paper` the full-length
# version of it (tens of minutes on 2 cores), `make test` runs the tests.
# Both install everything they need first (Debian packages through apt, a pinned .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-done
JOBS ?= 2

.PHONY: setup apt venv demo paper test lint fuzz bench zoo clean

setup: apt $(SETUP_STAMP) plugin xnnpack

apt:
	@scripts/setup-apt.sh

# QEMU instruction-count plugin (header from Debian's qemu source package): build/plugin/.
.PHONY: plugin
plugin: apt
	@scripts/build-plugin.sh

# XNNPACK for arm64 (libxnnpack-dev:arm64, the benchmark peer; tests/bench/test_bench.py runs it).
.PHONY: xnnpack
xnnpack: apt
	@scripts/setup-xnnpack.sh

$(SETUP_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,peers]'
	@touch $@

venv: $(SETUP_STAMP)

demo: setup
	$(BIN)/qacc demo

# The full-length demo: width sweeps on both networks, 6-epoch adaptive training, QEMU on 500 images.
paper: setup
	$(BIN)/qacc demo --full

test: setup lint
	$(BIN)/pytest -n $(JOBS) -q

# Differential fuzzing: N random graphs and quantized models, generated C == reference exactly.
N ?= 10000
fuzz: setup
	$(BIN)/python scripts/fuzz.py -n $(N)

# torchvision's zoo (random weights): every accepted model quantized, compiled, C == reference,
# and the same through torch.onnx.export (tens of minutes on 2 cores): build/zoo.json.
zoo: setup
	$(BIN)/python scripts/zoo.py --onnx --json build/zoo.json

# Instruction counts per target and accumulator width, with the peers: XNNPACK on Cortex-A
# (build/bench.json), CMSIS-NN on Cortex-M (build/bench-cortex-m.json).
bench: setup xnnpack
	$(BIN)/qacc bench --json build/bench.json
	$(BIN)/qacc bench --targets cortex-m55,cortex-m4,cortex-m7 --widths 16,32 --peers \
	    --networks layers,ds_cnn,mobilenet_v1,resnet8 --json build/bench-cortex-m.json

# Rate-accuracy curve of transform quantization vs uniform (Fashion-MNIST): build/rate/.
.PHONY: rate
rate: setup
	$(BIN)/qacc rate --out build/rate

lint: $(SETUP_STAMP)
	$(BIN)/ruff check codegen tests scripts examples setup.py
	$(BIN)/ruff format --check codegen tests scripts examples setup.py
	$(BIN)/mypy

clean:
	rm -rf build out .pytest_cache .mypy_cache .ruff_cache
