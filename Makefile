# Two commands do all set-up: `make demo` and `make test`. They create the
# virtual environments they need when missing (scripts/ensure_venv.sh) and
# reuse them: .venv, the pinned torch_xla stack, and .venv-jax, the newest
# JAX on Python >= 3.12 without torch.
VENV ?= .venv
JAX_VENV ?= .venv-jax
PY := $(VENV)/bin/python
JAX_PY := $(JAX_VENV)/bin/python
PYTEST_ARGS ?=
export PJRT_DEVICE ?= CPU
export HF_HUB_OFFLINE ?= 1
# torch's OpenMP workers otherwise spin and starve XLA's threads (tests/conftest.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv venv-jax demo test test-pinned test-jax test-slow bench bench-model

venv:
	@scripts/ensure_venv.sh $(VENV) pinned

venv-jax:
	@scripts/ensure_venv.sh $(JAX_VENV) jax

demo: venv
	$(VENV)/bin/xla-qops demo

# The suite on both stacks: everything on the pinned one, every test that does
# not need torch on the current one (tests/conftest.py leaves the rest out).
# Both run even if the first fails; the target fails if either does.
test: venv venv-jax
	@status=0; \
	echo "== tests on $(VENV) (pinned torch_xla stack)"; \
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) || status=1; \
	echo "== tests on $(JAX_VENV) (current JAX, no torch)"; \
	$(JAX_PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) || status=1; \
	exit $$status

test-pinned: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-jax: venv-jax
	$(JAX_PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv venv-jax
	@status=0; \
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || status=1; \
	$(JAX_PY) -m pytest -q -m slow $(PYTEST_ARGS) || status=1; \
	exit $$status

# bench: torch's peers with their default OpenMP wait policy, spinning briefly
# after their turn; huge pages for XLA's buffers as numpy's get (docs/bench.md).
bench: venv
	env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=20000 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
	  $(VENV)/bin/xla-qops bench

# bench-model: the end-to-end decoder benchmark (docs/bench_e2e.md) in the
# environment a user's script has: torch's default OpenMP policy, no tunables.
bench-model: venv
	env -u OMP_WAIT_POLICY $(VENV)/bin/xla-qops bench --model llama
