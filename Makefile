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

# bench: torch's peers with their default OpenMP wait policy, spinning briefly
# after their turn; huge pages for XLA's buffers as numpy's get (docs/bench.md).
bench: venv
	env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=20000 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
	  $(VENV)/bin/xla-qops bench
