# dpbench: two commands for a newcomer.
#   make reproduce   create .venv, install dpbench, run every notebook (cpu profile), write the report
#   make test        the layers contract (lint-imports), the test suite, then nbval over notebooks/ (smoke defaults)
# Other targets: venv, report, compare, bench, list. PROFILE=smoke|cpu|gpu picks the profile.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= cpu
BENCH_ARGS ?=
DPBENCH := $(PY) -m dpbench

.DEFAULT_GOAL := help
.PHONY: help venv reproduce test report compare bench list

help:
	@echo "make reproduce   set up .venv, run every notebook on the $(PROFILE) profile, write the report"
	@echo "make test        run the test suite and execute every notebook once (nbval)"
	@echo "make report      write results/$(PROFILE)/report.html from existing results"
	@echo "make compare A=results/smoke B=results/cpu   dpbench compare A B (differences with 95% CIs, plot)"
	@echo "make bench       dpbench bench --profile $(PROFILE) $(BENCH_ARGS)"
	@echo "make list        notebooks, profiles and last run status"
	@echo "variables: PROFILE=smoke|cpu|gpu (default cpu), PYTHON=python3"

venv: $(STAMP)

# The stamp is re-made only when pyproject.toml changes, so repeated `make` calls are fast.
# An existing .venv is reused, never deleted.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,bench]'
	$(PY) -m ipykernel install --sys-prefix --name dpbench --display-name "dpbench (.venv)"
	@touch $@

# The report is written even when a notebook failed; the exit status still reports the failure.
# It ends with the summary table (claims, ours, verdicts) and the report's path.
reproduce: venv
	@rc=0; $(DPBENCH) reproduce --profile $(PROFILE) || rc=$$?; \
	$(DPBENCH) report --profile $(PROFILE) --summary || exit $$?; \
	exit $$rc

# pytest exits 5 when it collects nothing (e.g. no notebooks yet); that is not a failure.
test: venv
	$(VENV)/bin/lint-imports
	@rc=0; $(PY) -m pytest tests -q || rc=$$?; \
	if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi
	@rc=0; $(PY) -m pytest --nbval-lax --nbval-current-env notebooks/ -q || rc=$$?; \
	if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi

report: venv
	$(DPBENCH) report --profile $(PROFILE) --summary

compare: venv
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make compare A=<results folder> B=<results folder>"; exit 2; }
	$(DPBENCH) compare $(A) $(B)

bench: venv
	$(DPBENCH) bench --profile $(PROFILE) $(BENCH_ARGS)

list: venv
	$(DPBENCH) list
