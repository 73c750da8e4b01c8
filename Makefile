# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
TOOLS := .tools

.PHONY: demo test chaos lint deploy-check bench-intake clean

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Bytecode compiled once at install, and written for our own modules: the tests start a hundred
# and more service processes, each importing faust, FastAPI and pydantic (2.4 s of CPU each when
# every module is compiled from source again, 1.0 s from bytecode).
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.synced: uv.lock pyproject.toml $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv sync --frozen --quiet --compile-bytecode
	touch $@

demo: $(VENV)/.synced  ## the whole stack on the embedded default, with the portal simulator
	$(VENV)/bin/motcua dev

test: $(VENV)/.synced lint deploy-check  ## lint, types, manifests, unit and integration tests
	$(VENV)/bin/pytest -q -n 3 --dist loadfile -m "not chaos" --durations=30  # the slowest 30 listed at the end; the tests wait on services about half the time: three workers keep 2 cores busy; a test module's broker stays in its worker

chaos: $(VENV)/.synced  ## crashes and outages under load: SIGKILLed workers, Redis lost, the broker stalled
	$(VENV)/bin/pytest -q -n 3 --dist loadfile -m chaos --durations=10  # mostly waiting out sessions and stalls: a third worker fits on 2 cores

lint: $(VENV)/.synced  ## style, types, and the architecture's import contracts (pyproject.toml)
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy services
	$(VENV)/bin/lint-imports

deploy-check: $(VENV)/.synced  ## validate compose, Kubernetes, Grafana and Dockerfile (no Docker needed)
	deploy/validate

bench-intake: $(VENV)/.synced
	$(VENV)/bin/python bench/intake.py

clean:
	rm -rf $(VENV) $(TOOLS) test-output
