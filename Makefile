# mcad: distill -> quantize -> export -> bench. Every target calls the `mcad` CLI in .venv.
# key=value overrides pass through ARGS, e.g. `make student ARGS="steps=200 seed=1"`.
SHELL := /bin/bash
PY    := .venv/bin/python
MCAD  := .venv/bin/mcad
DATA  := data/synth
TEACHERS := runs/teachers
CONFIG ?= student
RUN   ?=
TARGET ?= cpu
DEVICE ?= local
NPROC ?= 1
ARGS  ?=
TEACHER_ARGS ?=


.PHONY: install data teachers cache student ablation export bench gate search-bench report test test-fast lint clean help

help:
	@echo "make install | data | teachers | cache [NPROC=2] | student [CONFIG=... ARGS='k=v ...' NPROC=2] | ablation"
	@echo "make export TARGET=cpu|snapdragon|dimensity [RUN=runs/<name>] [STRICT=1] [HUB=1]"
	@echo "make bench DEVICE=local|<adb-serial>|qaihub:<name> [RUN=...] | gate [RUN=...] | report | test | test-fast"

# Idempotent: the venv is made once; pip re-checks the pinned set against requirements.lock.
.venv/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # pinned torch first: a later package that excludes it would pull another (GBs); the wheel this index serves decides CPU or CUDA (docs/real-data.md)
	$(PY) -m pip install -q -c requirements.lock -e ".[test]"
	$(PY) -m pip check
	touch $@
install: .venv/.installed

$(DATA)/dataset_synth.json: | .venv/.installed
	$(MCAD) data out=$(DATA)
data: $(DATA)/dataset_synth.json

# TEACHER_ARGS, not ARGS: `make student ARGS=steps=200` must not change the teachers
$(TEACHERS)/metrics.json: $(DATA)/dataset_synth.json
	$(MCAD) teachers data=$(DATA) out=$(TEACHERS) $(TEACHER_ARGS)
teachers: $(TEACHERS)/metrics.json

# the teachers' outputs over the training set, once; every student run and ablation reads them.
# Also remade when a teacher file is newer than the cache (copied in, retrained): `mcad student`
# refuses a cache whose recorded teacher hashes differ from the files
$(TEACHERS)/cache/manifest.json: $(TEACHERS)/metrics.json $(wildcard $(TEACHERS)/dual.safetensors $(TEACHERS)/fusion.safetensors $(TEACHERS)/tokenizer.json)
ifeq ($(NPROC),1)
	$(MCAD) cache data=$(DATA) teachers=$(TEACHERS)
else
	.venv/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m mcad.cli cache data=$(DATA) teachers=$(TEACHERS)
endif
cache: $(TEACHERS)/cache/manifest.json

# The embedded default (student, and student-mobile: the mobile-size student on the same teachers)
# needs the synthetic teachers and their cache first; a real-data recipe
# (CONFIG=flickr30k|coco|<yaml>) names its own teachers and data: it reads the cache that
# `mcad cache $(CONFIG) ...` made, or runs its teachers online (docs/real-data.md); nothing
# synthetic is made for it.
EMBEDDED_RECIPES := student student-mobile
STUDENT_DEPS := $(if $(filter $(EMBEDDED_RECIPES),$(CONFIG)),$(TEACHERS)/cache/manifest.json,.venv/.installed)
student: $(STUDENT_DEPS)
ifeq ($(NPROC),1)
	$(MCAD) student $(CONFIG) $(ARGS)
else
	.venv/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m mcad.cli student $(CONFIG) $(ARGS)
endif

ablation: $(TEACHERS)/cache/manifest.json
	$(MCAD) ablation $(ARGS)

export: | .venv/.installed
	$(MCAD) export target=$(TARGET) $(if $(RUN),run=$(RUN)) $(if $(STRICT),strict=$(STRICT)) $(if $(HUB),hub=$(HUB)) $(ARGS)

bench: | .venv/.installed
	$(MCAD) bench device=$(DEVICE) $(if $(RUN),run=$(RUN)) $(ARGS)

# CI's budget gate: the run's cpu export on this machine against benchmarks/budgets.yaml's `gate`
# entry, whose latency limits are multiples of a calibration kernel timed before and after each job (a busy
# neighbour slows both; a regression of the student only the job). Exit 1 names the broken budget.
# Then the ExecuTorch and LiteRT search programs, which ship with a gallery bound in (export/bound.py):
# exported with 100k seeded random rows (latency and memory do not depend on the values) and gated the same way.
GATE_COMMON := quick=1 threads=1 peers=none mobile=0 image=0 budget=gate results=none
GATE_ARGS := $(GATE_COMMON) target=cpu galleries=1000,100000
GATE_RUN = $(or $(RUN),runs/mcad-student)
# Its budgets were set on the embedded default's student (runs/mcad-student, what `make student`
# writes), so that is the run it gates unless RUN= names another, not the newest run.
gate: | .venv/.installed
	$(MCAD) bench device=local run=$(GATE_RUN) $(GATE_ARGS) $(ARGS)
	$(MCAD) export target=cpu run=$(GATE_RUN) gallery=random:100000 backends=xnnpack,tflite roles=text,search progress=0
	$(MCAD) bench device=local run=$(GATE_RUN) $(GATE_COMMON) target=cpu-bound galleries=100000 out=$(GATE_RUN)/bench/bound $(ARGS)

search-bench: | .venv/.installed
	$(PY) benchmarks/studies/search_bench.py $(if $(RUN),run=$(RUN)) $(ARGS)

report: | .venv/.installed
	$(MCAD) report $(RUN) $(ARGS)

test: .venv/.installed
	$(PY) -m pytest -q tests

# the edit loop: everything not marked slow (no training past a few steps, no export); CI runs `make test`
test-fast: .venv/.installed
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs data .pytest_cache
