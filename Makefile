# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PKGS   := qtee objects supplicant

CC     ?= cc
BRIDGE := qtee/bridge/libqtee_preload.so
BRIDGE_SRC := qtee/bridge/preload.c qtee/bridge/embed.c qtee/bridge/bridge.h
# The python3-config of the interpreter the virtualenv was made from (its libpython).
PYCONFIG = $(shell $(BIN)/python -c 'import os, sysconfig; p = os.path.join(sysconfig.get_config_var("BINDIR"), "python3-config"); print(p if os.path.exists(p) else "python3-config")')

.PHONY: test demo bench bench-spread lint typecheck pytest soak clean bridge

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# compat editable mode: see the README; setuptools' banner that it is transitional is silenced.
$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Compat editable installs' \
		$(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(PKGS) tests bench
	$(BIN)/ruff format --check $(PKGS) tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict $(PKGS)

pytest: $(STAMP)
	$(BIN)/python -m pytest

# The preload bridge (qtee run): built when a C compiler is there, else said once.
bridge: $(STAMP)
	@if command -v $(CC) >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory $(BRIDGE); \
	else \
		echo "bridge: no C compiler ($(CC)): qtee run and the C-program tests are unavailable"; \
	fi

$(BRIDGE): $(BRIDGE_SRC) $(STAMP)
	$(CC) -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ qtee/bridge/preload.c qtee/bridge/embed.c \
		$$($(PYCONFIG) --includes) $$($(PYCONFIG) --ldflags --embed) -ldl -lpthread

test: lint typecheck bridge pytest

demo: $(STAMP) bridge
	$(BIN)/qtee demo

bench: $(STAMP) bridge
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The targeted figures, five runs each: median and spread (the README's figures).
bench-spread: $(STAMP)
	$(BIN)/python bench/_spread.py --runs 5

soak: $(STAMP)
	QTEE_SOAK=1 $(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis $(BRIDGE)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
