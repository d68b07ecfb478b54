# Set-up and the everyday jobs. `make shakespeare` and `make test` work on a fresh clone: they create .venv first.
PYTHON ?= python3
VENV ?= .venv
# The torch release the project is tested with. On this CPU-only build machine pip takes its CPU wheel from
# local disk; elsewhere override it, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
# The wheel test installs the same spec into its fresh environment.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup shakespeare test lint docs clean

# torch comes through pip, which finds the local CPU wheel; the ~150 packages of the dev extras through uv, which
# installs them in ~60 s where pip took ~2 minutes on 2 cores (and keeps the torch already there). Compiled to
# bytecode at install, as pip does: uv does not by default, and where PYTHONDONTWRITEBYTECODE is set every one of
# the suite's hundreds of processes would compile numpy's and transformers' sources again (~1 s each).
$(BIN)/gptrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC) uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[dev]"
	touch $@

setup: $(BIN)/gptrain

# The main job: prepare Tiny Shakespeare, train the CPU recipe, sample from the best checkpoint.
shakespeare: setup
	$(BIN)/gptrain prepare shakespeare
	$(BIN)/gptrain train shakespeare_char_cpu --log_interval=100 --overwrite
	$(BIN)/gptrain sample --ckpt out/shakespeare_char_cpu --num_samples 2 --max_new_tokens 400

# One worker per core, one thread per worker: the suite's small models scale better across processes
# than across threads (about 1.5x on 2 cores). The suite includes the wheel test, the docs and `mkdocs build`.
test: setup
	TORCH_SPEC="$(TORCH_SPEC)" OMP_NUM_THREADS=1 $(BIN)/pytest -n auto --dist loadgroup

# Style: the rule set is in pyproject.toml.
lint: setup
	$(BIN)/ruff check .

# The documentation site, built into site/ (tests/test_docs.py builds it with --strict too).
docs: setup
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) out site *.egg-info
