# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   distill a student on the built-in digits data and print the results table
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.timm_icd-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: demo test study study2 bench-quality bench-step-time bench-epoch-time bench-data bench-arch bench-teacher-cache install

install: $(STAMP)

# reinstalls only when the dependency files change
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

# real Fashion-MNIST (Debian's dataset-fashion-mnist) for the studies, benchmarks and tests that train on it
$(FASHION_MNIST):
	apt-get install -y -q dataset-fashion-mnist >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)

demo: $(STAMP)
	$(PY) -m timm_icd demo

# two workers on the 2-core machine, one torch thread each (tests/conftest.py): a test that trains two processes
# runs beside another test, never beside a multi-threaded one
test: $(STAMP) $(FASHION_MNIST)
	$(PY) -m pytest -q -n 2 tests

# the v0.2 quality benchmark is archived (superseded by the studies): its report from the committed CSVs
bench-quality: $(STAMP)
	$(PY) benchmarks/archive/quality_report.py

# the first pre-registered study (benchmarks/results/protocol.md): teachers, tuning, confirmatory runs, report;
# it resumes where it stopped (19.7 h of recorded runs, 2 at a time, by results/study.md)
study: $(STAMP) $(FASHION_MNIST)
	$(PY) benchmarks/study.py all

# the second pre-registered study (benchmarks/results/protocol2.md): teachers, the three pairs' sweeps, the report;
# it resumes where it stopped (140 student runs, about 17 CPU-hours by protocol2.md, 2 side by side)
study2: $(STAMP) $(FASHION_MNIST)
	$(PY) benchmarks/study2.py all

bench-step-time: $(STAMP)
	$(PY) benchmarks/step_time.py

bench-epoch-time: $(STAMP) $(FASHION_MNIST)
	$(PY) benchmarks/epoch_time.py

bench-data: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/loader_profile.py

bench-arch: $(STAMP)
	$(PY) benchmarks/arch_coverage.py

bench-teacher-cache: $(STAMP) $(FASHION_MNIST)
	$(PY) benchmarks/cache_speed.py
