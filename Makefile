# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch; an unpinned torch pulls a multi-GB CUDA build. Override on GPU machines.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.textseg-installed

.PHONY: demo test lint setup clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The tests decode Label Studio exports with Label Studio's own RLE code; its brush module needs
	# only numpy and Pillow, while its declared dependencies would downgrade numpy and add OpenCV.
	$(BIN)/pip install -q --no-deps label-studio-sdk==2.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

lint: $(STAMP)
	$(BIN)/ruff check textseg jobs tests benchmarks
	$(BIN)/ruff format --check textseg jobs tests benchmarks
	$(BIN)/mypy textseg

# The report's browser test drives a real Chromium (Debian's package; Playwright downloads nothing).
chromium:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: lint chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
