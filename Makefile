# Quickstart: `make demo` (virtualenv + install + the main job on a bundled default), `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that installs offline here; a CUDA machine can pre-install its own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-lowest package-check bench mutation clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The demo is run_train.py's defaults (optvq-cifar10, bundled scikit-image crops, no codebook initialization,
# TensorBoard) sized to under a minute of CPU training: 256 codes, 500 steps of batch 32 at base lr 1e-4 (x 32).
# It fails (exit 3) if the model collapsed. DEMO_EXTRA adds arguments, e.g. DEMO_EXTRA="--seed 3".
DEMO_ARGS = --output_dir demo-output --config_overrides codebook_size=256 --max_train_steps 500 --train_batch_size 32 \
	--learning_rate 1e-4 --validation_steps 250 --fail_on_collapse
DEMO_EXTRA ?=

demo: install
	$(BIN)/python examples/run_train.py $(DEMO_ARGS) $(DEMO_EXTRA)

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q tests

# The suite on the lowest versions pyproject.toml allows (.ci/lowest_constraints.py pins every `>=` bound), in its
# own virtualenv; run it when a lower bound changes (not part of .ci/run: it downloads old releases).
test-lowest:
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) .ci/lowest_constraints.py > .venv-lowest/constraints.txt
	.venv-lowest/bin/python -m pip install --quiet -c .venv-lowest/constraints.txt -e ".[dev]"
	.venv-lowest/bin/python -m pytest -n 2 --dist loadfile -q -p no:cacheprovider tests

# Build the sdist and wheel, check them, install the wheel (after $(TORCH_SPEC)) into a fresh virtualenv in a temp
# folder and run the README's snippet, the metrics and the commands there (docs/installation.md).
package-check:
	TORCH_SPEC="$(TORCH_SPEC)" $(PYTHON) .ci/package_check.py

# Mutation testing of the core (tools/mutation.py, results in docs/testing.md): small edits of sinkhorn.py,
# quantization.py, autoencoder.py and the training losses, each run against the fast tests that call the edited
# function; a mutant that no test notices is listed in mutation-report/summary.md. Not part of `make test` or CI.
# MUTATION_ARGS="--targets sinkhorn", "--rerun" (only the last report's survivors), "--sample 4" (every 4th mutant).
MUTATION_ARGS ?=
mutation: install
	nice -n 5 $(BIN)/python tools/mutation.py $(MUTATION_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_quantizer.py

clean:
	rm -rf $(VENV) .venv-lowest demo-output .pytest_cache
