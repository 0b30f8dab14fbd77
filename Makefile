# Kernel-style build: configure (make menuconfig, make defconfig-<preset>),
# generate the typed settings from .config, train. `make help` lists it all.
#
# Every Python command runs in $(VENV), which `make deps` creates from
# pyproject.toml the first time it is needed (VENV=path uses another one).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp

KCONFIG_CONFIG ?= .config
export KCONFIG_CONFIG
KCONFIG := $(PY) -m scripts.kconfig
SETTINGS := generated/settings.py
DEFAULT_DEFCONFIG := gpt-bytes
NPROC ?= 1

# Presets: every file in defconfigs/ (its fragments/ folder holds fragments).
PRESET_NAMES := $(sort $(notdir $(filter-out $(patsubst %/,%,$(wildcard defconfigs/*/)),$(wildcard defconfigs/*))))
DEFCONFIG_TARGETS := $(addprefix defconfig-,$(PRESET_NAMES))
FRAGMENT_ARGS := $(foreach f,$(FRAGMENT),--fragment $(f))

# The settings depend on every Kconfig file (hidden folders such as .venv and
# .git, and the run and data folders, are not searched) and on the generator.
KCONFIG_FILES := $(patsubst ./%,%,$(shell find . \( -path './.*' -o -path ./runs -o -path ./data_cache \) -prune \
                   -o -type f -name 'Kconfig*' -print))
KCONFIG_TOOL := $(wildcard scripts/kconfig/*.py)

HELP_LINE := printf '  %-26s %s\n'

.DEFAULT_GOAL := help
.PHONY: help menuconfig defconfig $(DEFCONFIG_TARGETS) olddefconfig oldconfig savedefconfig listnewconfig \
        list-defconfigs diffconfig setconfig settings train sample test bench report compare compare-spikes sweep check-presets update-baselines check data-filter verify-data clean \
        mrproper distclean deps

help:
	@echo 'Configuration (.config; KCONFIG_CONFIG=path for another file):'
	@$(HELP_LINE) menuconfig 'Edit .config in menus (kconfiglib); saved only if it passes the checks'
	@$(HELP_LINE) defconfig '.config from the default preset defconfigs/$(DEFAULT_DEFCONFIG); FRAGMENT="a b" merges defconfigs/fragments/{a,b}.config'
	@$(foreach d,$(PRESET_NAMES),$(HELP_LINE) 'defconfig-$(d)' '.config from the preset defconfigs/$(d); FRAGMENT= as for defconfig';)
	@$(HELP_LINE) olddefconfig 'Update .config to the Kconfig files, new symbols at their defaults'
	@$(HELP_LINE) oldconfig 'Update .config to the Kconfig files, asking for each new symbol'
	@$(HELP_LINE) savedefconfig 'Save the minimal form of .config as ./defconfig (a preset for defconfigs/)'
	@$(HELP_LINE) listnewconfig 'List the settable symbols that .config does not set'
	@$(HELP_LINE) list-defconfigs 'List the presets and fragments'
	@$(HELP_LINE) diffconfig 'Show what differs between A= and B= (default: .config.old and .config)'
	@$(HELP_LINE) setconfig 'Set symbols in .config, checked: make setconfig SET="LR=1e-3 SPAM_INTERVAL=500"'
	@$(HELP_LINE) settings 'Generate $(SETTINGS) from .config (done by train and sample when needed)'
	@echo 'Training:'
	@$(HELP_LINE) train 'Train with the settings (NPROC=N: N processes with torch.distributed.run; NNODES= NODE_RANK= MASTER_ADDR= MASTER_PORT= for several nodes)'
	@$(HELP_LINE) sample 'Print a text sample from the latest checkpoint of the configured run'
	@$(HELP_LINE) report 'Write the training-health report of a run: make report RUN=runs/<name>'
	@$(HELP_LINE) compare 'Train and compare presets: make compare DEFCONFIGS="gpt2-tiny gpt2-tiny-adamw" [SEEDS= JOBS=]'
	@$(HELP_LINE) compare-spikes 'The spike benchmark: 8 methods x 5 spike scenarios x 3 seeds + an LR sweep (docs/spike-experiment.md)'
	@$(HELP_LINE) sweep 'Train every combination: make sweep DEFCONFIG=gpt2-tiny SWEEP="LR=3e-4,1e-3 SPAM_THETA=50,5000" [SEEDS= JOBS= MAX_ITERS=]'
	@$(HELP_LINE) check 'Pre-flight check of .config: build everything, time a few steps, estimate memory and run time'
	@$(HELP_LINE) check-presets 'Regression gate: short CPU runs of the presets in baselines/ against their stored losses'
	@$(HELP_LINE) update-baselines 'Rewrite baselines/*.json from this code (PRESETS="a b" for some; a new preset gets one)'
	@$(HELP_LINE) data-filter 'Corpus without the documents behind gradient spikes: make data-filter RUN=runs/<name> [OUT= MIN_SPIKES=]'
	@$(HELP_LINE) verify-data 'Check every file of the configured token corpus: size, sha256, token ids'
	@$(HELP_LINE) bench 'Run the benchmarks'
	@$(HELP_LINE) test 'Run the test suite (TEST_JOBS=2 worker processes; 0: one process)'
	@echo 'Housekeeping:'
	@$(HELP_LINE) deps 'Create $(VENV) and install the pinned dependencies of pyproject.toml'
	@$(HELP_LINE) clean 'Remove generated files ($(dir $(SETTINGS)), Python caches)'
	@$(HELP_LINE) mrproper 'clean, and remove .config, .config.old and ./defconfig'
	@$(HELP_LINE) distclean 'mrproper, and remove .venv (runs/ and data_cache/ are kept)'
	@$(HELP_LINE) help 'This list'

# ---------------------------------------------------------------------------
# Python environment

deps: $(DEPS_STAMP)

# torch is installed first, pinned, so that pip takes the CPU wheel from its
# find-links instead of resolving the range in pyproject.toml to the newest
# CUDA build (several GB).
$(DEPS_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install 'torch==2.13.0'
	$(PY) -m pip install -e '.[test]'
	@touch $@

# ---------------------------------------------------------------------------
# Configuration

# No .config yet: start from the default preset.
$(KCONFIG_CONFIG): | $(DEPS_STAMP)
	@echo 'note: no $@ yet, creating it from the default preset defconfigs/$(DEFAULT_DEFCONFIG)'
	@$(KCONFIG) defconfig defconfigs/$(DEFAULT_DEFCONFIG)

menuconfig: $(KCONFIG_CONFIG) | $(DEPS_STAMP)
	@$(KCONFIG) menuconfig

defconfig: | $(DEPS_STAMP)
	@$(KCONFIG) defconfig defconfigs/$(DEFAULT_DEFCONFIG) $(FRAGMENT_ARGS)

$(DEFCONFIG_TARGETS): defconfig-%: | $(DEPS_STAMP)
	@$(KCONFIG) defconfig defconfigs/$* $(FRAGMENT_ARGS)

olddefconfig oldconfig listnewconfig: $(KCONFIG_CONFIG) | $(DEPS_STAMP)
	@$(KCONFIG) $@

savedefconfig: $(KCONFIG_CONFIG) | $(DEPS_STAMP)
	@$(KCONFIG) savedefconfig defconfig

list-defconfigs: | $(DEPS_STAMP)
	@$(KCONFIG) list-defconfigs

diffconfig: | $(DEPS_STAMP)
	@$(KCONFIG) diffconfig $(A) $(B)

# SET is split and unquoted by the shell: SET='OUT_DIR="runs/my run" LR=1e-3'
setconfig: $(KCONFIG_CONFIG) | $(DEPS_STAMP)
	@$(KCONFIG) setconfig $(SET)

settings: $(SETTINGS)

# A real file: regenerated only when .config, a Kconfig file or the generator changes.
$(SETTINGS): $(KCONFIG_CONFIG) $(KCONFIG_FILES) $(KCONFIG_TOOL) | $(DEPS_STAMP)
	@$(KCONFIG) settings $@

# ---------------------------------------------------------------------------
# Training and tools

# NPROC=N > 1: one process per device (or CPU worker), started by torchrun.
# NNODES=M > 1: run the same command on every node, each with its NODE_RANK
# (0..M-1) and the address and a free port of node 0 (torchrun's static rendezvous).
NNODES ?= 1
NODE_RANK ?= 0
MULTINODE_ARGS = --nnodes=$(NNODES) --node_rank=$(NODE_RANK) --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)
ifneq ($(filter-out 0 1,$(NNODES)),)
TRAIN = $(PY) -m torch.distributed.run $(MULTINODE_ARGS) --nproc_per_node=$(NPROC) -m train
else
TRAIN = $(if $(filter-out 0 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m train,$(PY) -m train)
endif

train: $(SETTINGS) | $(DEPS_STAMP)
ifneq ($(filter-out 0 1,$(NNODES)),)
	@test -n '$(MASTER_ADDR)' -a -n '$(MASTER_PORT)' || { echo 'make train NNODES=$(NNODES): name node 0 with MASTER_ADDR=<host> MASTER_PORT=<port> (and NODE_RANK=0..$(NNODES)-1 on each node)' >&2; exit 1; }
endif
	$(TRAIN)

sample: $(SETTINGS) | $(DEPS_STAMP)
	@$(PY) -m train.sample

report: | $(DEPS_STAMP)
	@test -n '$(RUN)' || { echo 'make report: name the run folder, e.g. make report RUN=runs/gpt2-tiny' >&2; exit 1; }
	@$(PY) -m monitor.report $(RUN)

# make compare DEFCONFIGS="gpt2-tiny gpt2-tiny-adamw+clip1" [SEEDS=3] [MAX_ITERS=N] [JOBS=2] [OUT=dir] [SET="NAME=VALUE ..."]
COMPARE_ARGS = $(if $(SEEDS),--seeds $(SEEDS)) $(if $(MAX_ITERS),--max-iters $(MAX_ITERS)) \
               $(if $(JOBS),--jobs $(JOBS)) $(if $(OUT),--out $(OUT)) $(foreach s,$(SET),--set $(s))

compare: | $(DEPS_STAMP)
	@test -n '$(DEFCONFIGS)' || { echo 'make compare: name the configurations, e.g. make compare DEFCONFIGS="gpt2-tiny gpt2-tiny-adamw"' >&2; exit 1; }
	@$(PY) -m scripts.compare $(DEFCONFIGS) $(COMPARE_ARGS)

compare-spikes: | $(DEPS_STAMP)
	@$(PY) -m scripts.spike_bench $(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS)) $(if $(OUT),--out $(OUT)) $(if $(GATES),--gates) $(if $(PRESET),--preset $(PRESET)) $(if $(SPIKE_LR),--lr $(SPIKE_LR))

# make sweep DEFCONFIG=gpt2-tiny SWEEP="LR=3e-4,1e-3,3e-3 SPAM_THETA=50:5000:3" [SEEDS= JOBS= MAX_ITERS= OUT= SET=]
sweep: | $(DEPS_STAMP)
	@test -n '$(SWEEP)' || { echo 'make sweep: name the settings to sweep, e.g. make sweep DEFCONFIG=gpt2-tiny SWEEP="LR=3e-4,1e-3,3e-3"' >&2; exit 1; }
	@$(PY) -m scripts.sweep $(or $(DEFCONFIG),$(DEFAULT_DEFCONFIG)) $(SWEEP) $(COMPARE_ARGS)

# Pre-flight: everything training builds, one real batch, a few timed steps; no training.
check: $(SETTINGS) | $(DEPS_STAMP)
	@$(PY) -m train.preflight

# The regression gate (CI runs it beside `make test`); PRESETS="a b" checks or records only those.
check-presets: | $(DEPS_STAMP)
	@$(PY) -m scripts.check_presets $(PRESETS)

update-baselines: | $(DEPS_STAMP)
	@$(PY) -m scripts.check_presets --update $(PRESETS) $(foreach s,$(SET),--set $(s))

# make data-filter RUN=runs/<name> [OUT=dir] [MIN_SPIKES=K]
data-filter: | $(DEPS_STAMP)
	@test -n '$(RUN)' || { echo 'make data-filter: name the run folder, e.g. make data-filter RUN=runs/gpt2-tiny' >&2; exit 1; }
	@$(PY) -m scripts.data_filter $(RUN) $(if $(OUT),--out $(OUT)) $(if $(MIN_SPIKES),--min-spikes $(MIN_SPIKES))

verify-data: $(SETTINGS) | $(DEPS_STAMP)
	@$(PY) -m scripts.verify_data --settings $(SETTINGS)

bench: | $(DEPS_STAMP)
	@$(PY) -m scripts.bench

# Worker processes for the suite (pytest-xdist); most tests wait on training
# subprocesses of one thread each, so 2 workers use both cores of a 2-core CI
# machine. TEST_JOBS=0 runs the tests one after another in one process.
TEST_JOBS ?= 2

test: | $(DEPS_STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) tests

# ---------------------------------------------------------------------------
# Housekeeping (runs/ and data_cache/ hold results and downloads: never removed)

clean:
	rm -rf $(dir $(SETTINGS)) .pytest_cache
	find . -path './.*' -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

mrproper: clean
	rm -f $(KCONFIG_CONFIG) $(KCONFIG_CONFIG).old defconfig

distclean: mrproper
	rm -rf .venv *.egg-info
