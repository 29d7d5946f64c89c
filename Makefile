# kvmkit: the two commands of the README, and their parts.
#   make demo   set up, then boot the default Linux guest and run a command in it (in the
#               lane when the host has no VMX/SVM)
#   make test   set up, then run every test: unit and /dev/kvm tests on the host, lane tests,
#               and the hardware-virtualization tests (inside `kvmkit lane` when the host
#               has no VMX/SVM)
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: setup demo test test-host test-hwvirt lint clean bench-migration bench-startup bench-exits soak fuzz

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[dev,fuzz]'
	touch $@

setup: $(VENV)/.installed
	bash scripts/setup-host.sh

demo: setup
	bash scripts/demo.sh

test: setup test-host test-hwvirt

test-host: $(VENV)/.installed
	$(VPY) -m pytest -m "not hwvirt" tests

test-hwvirt: $(VENV)/.installed
	bash scripts/run-hwvirt-tests.sh $(VPY)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

# Live-migration benchmark against QEMU (docs/migration.md): a quiet machine, in the lane
# unless the host has VMX/SVM; about an hour with the defaults.
bench-migration: $(VENV)/.installed
	$(VPY) -m kvmkit lane --cpus 2 --mem-mib 8192 --timeout 7200 -- $(VPY) bench/migration.py $(BENCH_ARGS)

# Start-up (API socket ready, RSS) and port-I/O exit cost against QEMU, on the host (no lane):
# a quiet machine, a minute or two each (bench/startup.py, bench/exits.py).
bench-startup: $(VENV)/.installed
	$(VPY) bench/startup.py $(BENCH_ARGS)

bench-exits: $(VENV)/.installed
	$(VPY) bench/exits.py $(BENCH_ARGS)

# Coverage-guided fuzzing (docs/security.md): each target FUZZ_SECONDS with atheris, one
# after the other, stopping at the first crash; new inputs go to .fuzz/ (not committed).
FUZZ_SECONDS ?= 120
fuzz: $(VENV)/.installed
	$(VPY) tests/fuzz/run.py --all --seconds $(FUZZ_SECONDS) $(if $(FUZZ_TARGETS),--targets $(FUZZ_TARGETS))

# Soak (bench/soak.py): 50 tiny-guest microVMs through the API for 10 minutes of traffic
# and lifecycle, watched for failures and resource growth; not in CI. SOAK_ARGS="--vms 10
# --duration 120" for a shorter one.
soak: $(VENV)/.installed
	$(VPY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .fuzz
