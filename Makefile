# Quick start: `make demo` runs the whole pipeline on bundled data, `make test` runs the test suite.
# Both install what they need first (torch before the rest, so no CUDA build is pulled on a CPU box).
PYTHON ?= python3
DEMO_DIR ?= build/demo
# A value as one single-quoted shell word (a ' inside becomes '\''): paths with spaces or ;$` reach the shell as text.
shell_quote = '$(subst ','\'',$(1))'
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)

.PHONY: install demo test test-quick lint clean

install: build/.installed

build/.installed: setup.py
	@mkdir -p build
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"
	@touch $@

demo: install
	bash tools/demo.sh $(call shell_quote,$(DEMO_DIR))

test: install
	$(PYTHON) -m pytest tests

test-quick: install
	$(PYTHON) -m pytest tests -m "not slow"

lint:
	ruff check pipeline tools tests

clean:
	rm -rf build
