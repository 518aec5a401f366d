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

demo: install
	$(BIN)/python examples/demo.py --output_dir demo-output

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q tests

bench: install
	$(BIN)/python benchmarks/bench_quantizer.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
