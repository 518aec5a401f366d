# Quickstart: `make demo` (virtualenv + install + the main job on a bundled default), `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that installs offline here; a CUDA machine can pre-install its own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The demo is run_train.py's defaults (optvq-cifar10, bundled scikit-image crops, no codebook initialization,
# TensorBoard) sized to about 40 s of CPU training: 256 codes, 500 steps of batch 32 at base lr 1e-4 (x 32).
# It fails (exit 3) if the model collapsed. DEMO_EXTRA adds arguments, e.g. DEMO_EXTRA="--seed 3".
DEMO_ARGS = --output_dir demo-output --config_overrides codebook_size=256 --max_train_steps 500 --train_batch_size 32 \
	--learning_rate 1e-4 --validation_steps 250 --fail_on_collapse
DEMO_EXTRA ?=

demo: install
	$(BIN)/python examples/run_train.py $(DEMO_ARGS) $(DEMO_EXTRA)

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q tests

bench: install
	$(BIN)/python benchmarks/bench_quantizer.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
