# The two commands the README promises: `make run` and `make test`. Each sets up .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXT_STAMP := $(VENV)/.ext-built
SOURCES := $(shell find aobd -name '*.py' -o -name '*.pyx' -o -name '*.pyi' 2>/dev/null)

.PHONY: run test lint typecheck test-python test-c build bench profile profile-planes clean promtool sqlite-headers

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cython
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

# Cython twins and the compiled engine modules (aobd/_impl.py), built in place; the pure-Python sources remain the
# specification. The SQLite group writer links the system libsqlite3 (the one Python's sqlite3 module uses) and
# needs its header (Debian libsqlite3-dev).
COMPILED := $(shell $(PYTHON) -c "import runpy; m = runpy.run_path('aobd/_impl.py'); print(' '.join(m['source_path'](n, '') for n in m['COMPILED_MODULES']))")
# Cython reuses generated C newer than its source, but the directives live in setup.py: a changed setup.py
# regenerates it all.
TWINS := $(wildcard aobd/_fast/*.pyx)
# Declarations that make a compiled module's classes extension types (aobd/engine/machine.pxd): a changed one
# regenerates its module's C.
PXDS := $(wildcard $(COMPILED:.py=.pxd))
$(EXT_STAMP): $(STAMP) setup.py $(TWINS) aobd/_impl.py $(COMPILED) $(PXDS) | sqlite-headers
	if [ -f $@ ] && [ setup.py -nt $@ ]; then rm -f $(COMPILED:.py=.c) $(TWINS:.pyx=.c); fi
	for pxd in $(PXDS); do if [ -f $@ ] && [ $$pxd -nt $@ ]; then rm -f $${pxd%.pxd}.c; fi; done
	AOBD_BUILD_EXT=1 $(PY) setup.py -q build_ext --inplace --parallel 2
	touch $@

build: $(EXT_STAMP)

run: build
	$(PY) examples/showcase/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check aobd tests perf
	$(VENV)/bin/ruff format --check aobd tests perf

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Both implementations of aobd._fast (as psycopg does with PSYCOPG_IMPL): the engine's semantics, the conformance
# data and the differential tests run under the pure-Python reference too; the whole suite, with the daemons and the
# services, runs under the Cython twins the daemon loads by default. A second pass of the processes and services
# would add minutes to run the same reference code the unit pass already covers.
test-python: build
	AOBD_IMPL=python $(PY) -m pytest -q -p no:cacheprovider tests/unit tests/conformance

test-c: build
	AOBD_IMPL=c $(PY) -m pytest -q -p no:cacheprovider tests

sqlite-headers:
	@test -f /usr/include/sqlite3.h || { \
		echo "installing the SQLite header (Debian package libsqlite3-dev)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libsqlite3-dev >/dev/null) \
		|| echo "warning: could not install libsqlite3-dev; the C extensions will not build"; }

# promtool checks the /metrics exposition in the test suite (Debian package "prometheus").
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
		echo "installing promtool (Debian package prometheus)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
		|| echo "warning: could not install promtool; its test fails under AOBD_REQUIRE_SERVICES=1"; }

test: build promtool lint typecheck test-python test-c

bench: build
	$(PY) -m perf.bench_patch
	$(PY) -m perf.bench_routing
	$(PY) -m perf.bench_store
	$(PY) -m perf.bench_engine
	if command -v valgrind >/dev/null; then $(PY) -m perf.instructions; else echo "perf.instructions skipped: no valgrind"; fi
	$(PY) -m perf.w6 --mode inprocess --runs 2000 --concurrency 200
	$(PY) -m perf.longpoll --requests 300

# Where in-process W6 spends its CPU (py-spy, --nonblocking: see docs/decisions.md), summarized by function.
# AOBD_IMPL=python: compiled functions have no Python frames for py-spy to name, so the profile runs the same
# engine from its source (and the SQLite writer's pure-Python twin).
profile: build
	AOBD_IMPL=python $(VENV)/bin/py-spy record --nonblocking --gil -r 500 -f raw -o build/w6.spy -- \
		$(PY) -m perf.w6 --mode inprocess --runs 6000 --concurrency 64 --fidelity full
	$(PY) -m perf.spy_top build/w6.spy --top 40

# Where the multi-process daemon spends its CPU under W6 over HTTP/2 (needs h2load: apt-get install nghttp2-client).
profile-planes: build
	AOBD_IMPL=python $(PY) -m perf.profile_planes --runs 10000

clean:
	rm -rf build dist *.egg-info aobd/_fast/*.so aobd/_fast/*.c $(COMPILED:.py=.c) $(COMPILED:.py=.*.so) \
		$(EXT_STAMP) .pytest_cache .mypy_cache .ruff_cache
