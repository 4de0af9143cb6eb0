# The two commands of the README: `make demo` and `make test`. Each bootstraps .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# keras-hub without its tensorflow-text requirement (setup.py says why), at setup.py's bounds.
KERAS_HUB := $(shell sed -n 's/^KERAS_HUB = "\(.*\)".*/\1/p' setup.py)

export TF_CPP_MIN_LOG_LEVEL ?= 2
# The suites are benchmarks/bench_*.py (pytest collects test_*.py by default).
BENCH_FILES := -o python_files=bench_*.py
export PYTHONHASHSEED ?= 0

# The PyTorch peers of the KFAC factors (benchmarks/peers_kfac.py) live in a venv of their
# own, so that .venv (make test, CI) never holds torch. TORCH_CPU: torch's CPU build, which
# pip must find (on this machine, in its local wheels; elsewhere add PyTorch's CPU wheel
# index with PIP_EXTRA_INDEX_URL): the pin fails rather than fetch the CUDA build.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed
TORCH_CPU ?= torch==2.13.0+cpu

.PHONY: venv test test-slow demo bench bench-peers profile clean

venv: $(STAMP)

# --no-compile: pip would byte-compile all ~11k installed modules (~35 s on this machine);
# Python compiles the modules a process imports on first use and caches them.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade "pip>=24"
	$(PY) -m pip install --quiet --no-compile -e ".[tf-cpu,dev,hub]"
	$(PY) -m pip install --quiet --no-compile --no-deps "$(KERAS_HUB)"
	touch $(STAMP)

# Two pytest-xdist workers (this machine's 2 cores): the tests are small graphs whose time
# is mostly single-threaded tracing and Python. `TEST_WORKERS=0` runs them in one process.
# One pytest run holds the tests and the benchmarks' smoke pass (--benchmark-disable: every
# benchmark once, on tiny inputs; the benchmarks first, the many short tests last): two runs
# would start their workers (TensorFlow, the collection) twice and wait twice for the last test.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest benchmarks tests -q -m "not slow" --benchmark-disable -n $(TEST_WORKERS) \
		-o python_files="bench_*.py test_*.py"

# The long tests `make test` leaves out (marked `slow`: other oracle variants, larger models).
test-slow: $(STAMP)
	$(PY) -m pytest tests -q -m slow -n $(TEST_WORKERS)
	FASTEWC_FUZZ_EXAMPLES=300 $(PY) -m pytest tests/test_fuzz.py -q -n $(TEST_WORKERS)

demo: $(STAMP)
	$(PY) -m fastewc demo $(ARGS)

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-json=benchmarks/results/latest.json $(BENCH_FILES) $(ARGS)

$(PEERS_STAMP): setup.py
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --upgrade "pip>=24"
	$(PEERS_PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PEERS_PY) -m pip install --quiet -e ".[tf-cpu,dev,peers]"
	touch $(PEERS_STAMP)

# fastewc's KFAC factors, the hand-written kernel, ASDL and curvlinops, interleaved
# (ARGS: e.g. --problems mlp --kinds exact --rounds 5).
bench-peers: $(PEERS_STAMP)
	mkdir -p benchmarks/results
	$(PEERS_PY) -m benchmarks.peers_kfac --json benchmarks/results/peers.json $(ARGS)

profile: $(STAMP)
	$(PY) -m profiles.capture $(ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .benchmarks build *.egg-info
