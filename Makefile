# captioner: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := --dataset demo --data-dir data
DEMO_START := $(shell date +%s)

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench bench-quality bench-serve clean-demo

help:  ## List every target
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/captioner: pyproject.toml
	@echo "install: creating $(VENV) and installing captioner with the dev extra"
	@echo "  (TensorFlow, Streamlit, Playwright...: about 3 GB, several minutes the first time)"
	@start=$$(date +%s) \
	&& echo "  $(PYTHON) -m venv $(VENV)" && $(PYTHON) -m venv $(VENV) \
	&& echo "  pip install --upgrade pip" && $(BIN)/pip install --quiet --upgrade pip \
	&& echo "  pip install -e '.[dev]'" && $(BIN)/pip install --quiet -e '.[dev]' \
	&& touch $@ \
	&& echo "install: done in $$(( $$(date +%s) - start )) s; $(BIN)/captioner is ready"

install: $(BIN)/captioner  ## Create .venv and install captioner with the dev extra
	@echo "install: $(VENV) is up to date with pyproject.toml"

demo: install  ## Run the whole pipeline offline on the synthetic dataset and caption an image
	$(BIN)/captioner download $(DEMO)
	$(BIN)/captioner clean $(DEMO)
	$(BIN)/captioner features $(DEMO)
	$(BIN)/captioner tokenizer $(DEMO)
	$(BIN)/captioner train $(DEMO) --name demo
	$(BIN)/captioner evaluate --run runs/demo --split test
	@image="data/demo/raw/Flicker8k_Dataset/$$(head -n 1 data/demo/raw/Flickr8k_text/Flickr_8k.testImages.txt)" \
	&& echo "$(BIN)/captioner caption --model runs/demo $$image" \
	&& line="$$($(BIN)/captioner caption --model runs/demo "$$image")" \
	&& echo "$$line" \
	&& $(BIN)/python scripts/demo_summary.py runs/demo "$$line" $$(( $$(date +%s) - $(DEMO_START) ))

test: install  ## Run the whole test suite, as CI does (network-free)
	$(BIN)/pytest -q

test-fast: install  ## The edit-test loop: every test without the `slow` marker
	$(BIN)/pytest -q -m "not slow"

lint: install  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install  ## Benchmarks against the reference approach (see BENCHMARKS.md)
	$(BIN)/python scripts/bench.py features
	$(BIN)/python scripts/bench.py train
	$(BIN)/python scripts/bench.py decode

bench-quality: install  ## Caption quality on real Flickr8k features (dev), ours vs the reference (~30 min)
	$(BIN)/python scripts/bench.py quality

bench-serve: install  ## captioner serve under load, batching on vs off, on 127.0.0.1 (~5 min)
	$(BIN)/python scripts/bench.py serve

clean-demo:  ## Remove the demo data and run
	rm -rf data/demo runs/demo
