# Two commands do all set-up: `make demo` and `make test`. Each creates .venv
# with the pinned stack when missing (scripts/ensure_venv.sh) and reuses it.
VENV ?= .venv
PY := $(VENV)/bin/python
export PJRT_DEVICE ?= CPU
export HF_HUB_OFFLINE ?= 1
# torch's OpenMP workers otherwise spin and starve XLA's threads (tests/conftest.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test test-slow bench

venv:
	@scripts/ensure_venv.sh $(VENV)

demo: venv
	$(VENV)/bin/xla-qops demo

test: venv
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

bench: venv  # torch's peers run with their default OpenMP wait policy
	env -u OMP_WAIT_POLICY $(VENV)/bin/xla-qops bench
