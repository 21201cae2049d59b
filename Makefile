# The README's two commands: `make run` (main job on the embedded default) and `make test`.
# Both create .venv on first use: torch first (CPU build from this machine's disk, or the
# build named by TORCH_INDEX), then the package with its dev extras, pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

# Offline-friendly defaults: no telemetry from any tool in the stack.
export HF_HUB_DISABLE_TELEMETRY ?= 1
export DO_NOT_TRACK ?= 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: install browser postgres run test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# $(call apt_install,PACKAGE,WHAT NEEDS IT): install a Debian package when apt is usable
# (root), else say what will skip. The browser and PostgreSQL test dependencies use it.
apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(1) (Debian) for $(2)"; \
		(apt-get install -y -q --no-install-recommends $(1) >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q --no-install-recommends $(1) >/dev/null 2>&1)) || \
		echo "warning: could not install $(1); $(2) will skip"; \
	else echo "note: $(1) missing; $(2) will skip"; fi

# The serving page is tested in Debian's headless Chromium. Installed here when missing and
# apt is usable (root); otherwise that one test skips and says why.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then $(call apt_install,chromium,the browser test); fi

# The registry, stack and flow tests also run on a real PostgreSQL server (Debian's package),
# installed here when missing and apt is usable; otherwise those variants skip and say why.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && \
		! command -v pg_config >/dev/null; then \
		$(call apt_install,postgresql,the PostgreSQL tests); \
	fi

run: install
	$(BIN)/sur run

test: install lint browser postgres
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
