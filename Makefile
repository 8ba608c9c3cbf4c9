# Two commands do all set-up: `make demo` and `make test`. They create the
# virtual environments they need when missing (scripts/ensure_venv.sh) and
# reuse them: .venv, the pinned torch_xla stack, and .venv-current, the newest
# JAX and torch on Python >= 3.12 without torch_xla. .venv-jax (the newest JAX
# without torch: the torch-free install) is only for `make test-jax`.
VENV ?= .venv
CURRENT_VENV ?= .venv-current
JAX_VENV ?= .venv-jax
TORCHAX_VENV ?= .venv-torchax
PY := $(VENV)/bin/python
CURRENT_PY := $(CURRENT_VENV)/bin/python
JAX_PY := $(JAX_VENV)/bin/python
PYTEST_ARGS ?=
export PJRT_DEVICE ?= CPU
export HF_HUB_OFFLINE ?= 1
# torch's OpenMP workers otherwise spin and starve XLA's threads (tests/conftest.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv venv-current venvs venv-jax venv-torchax demo test test-pinned test-current test-jax \
	test-torchax test-slow \
	bench bench-model

venv:
	@scripts/ensure_venv.sh $(VENV) pinned

venv-current:
	@scripts/ensure_venv.sh $(CURRENT_VENV) current

venv-jax:
	@scripts/ensure_venv.sh $(JAX_VENV) jax

venv-torchax:
	@scripts/ensure_venv.sh $(TORCHAX_VENV) torchax

demo: venv
	$(VENV)/bin/xla-qops demo

# Both stacks' environments at once: pip's unpacking and the C++ build are
# single-threaded for most of an install, so on a fresh machine the two
# installs overlap on the two cores.
venvs:
	@scripts/ensure_venv.sh $(VENV) pinned & pinned=$$!; status=0; \
	scripts/ensure_venv.sh $(CURRENT_VENV) current || status=1; \
	wait $$pinned || status=1; exit $$status

# The suite on both stacks, side by side (scripts/test_stacks.sh): on the
# pinned one everything; on the current one every test that does not need
# torch_xla, torch's included (tests/conftest.py leaves the torch_xla files and
# the tests marked torch_xla out there); the core's parametrized matrices are
# split between the two (tests/conftest.py SHARED_MATRIX_FILES). The target
# fails if either run does.
test: venvs
	@scripts/test_stacks.sh $(PY) $(CURRENT_PY) $(PYTEST_ARGS)

test-pinned: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-current: venv-current
	$(CURRENT_PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The torch-free install (the core's own dependencies only); not part of `make test`.
test-jax: venv-jax
	$(JAX_PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The torchax route on current JAX (requirements-torchax.txt: torch 2.12.1, the
# newest torchax imports on no later torch); not part of `make test`.
test-torchax: venv-torchax
	$(TORCHAX_VENV)/bin/python -m pytest -q -m "torchax and not slow" $(PYTEST_ARGS)

test-slow: venv venv-current
	@status=0; \
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || status=1; \
	$(CURRENT_PY) -m pytest -q -m slow $(PYTEST_ARGS) || status=1; \
	exit $$status

# bench: torch's peers with their default OpenMP wait policy, spinning briefly
# after their turn; huge pages for XLA's buffers as numpy's get (docs/bench.md).
bench: venv
	env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=20000 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
	  $(VENV)/bin/xla-qops bench

# bench-model: the end-to-end decoder benchmark (docs/bench_e2e.md) in the
# environment a user's script has: torch's default OpenMP policy, no tunables.
# llama.cpp, the peer a CPU user would pick, is built once into build/llama_cpp
# (benchmark-only, never a dependency; about 5 minutes on a quiet machine).
bench-model: venv
	@scripts/ensure_llama_cpp.sh $(PY)
	env -u OMP_WAIT_POLICY $(VENV)/bin/xla-qops bench --model llama

# sanitize: the C++ extension built with ASan+UBSan in build/sanitize (the
# install's build untouched), then the C++-facing tests and the seeded
# fuzzers run against it; FUZZ_CASES=n adds a long fuzz run under it
# (docs/reliability.md).
sanitize: venv
	scripts/sanitize.sh $(PYTEST_ARGS)

# fuzz: the native entry points (torch operator, XLA FFI target) with
# FUZZ_CASES random cases per property; prints the number of calls.
FUZZ_CASES ?= 2000
fuzz: venv
	$(PY) scripts/fuzz.py --cases $(FUZZ_CASES) $(PYTEST_ARGS)

.PHONY: sanitize fuzz
