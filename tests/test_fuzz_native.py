"""Property-based fuzzing of the two native entry points (issue 27, docs/reliability.md).

The C++ kernels are reached with pointers from two places: the torch operator
``torch.ops.xla_qops_cpu.quantized_matmul`` (csrc/torch_ops.cc) and the XLA
FFI target ``xla_qops_quantized_matmul`` (csrc/module.cc). Both are fuzzed
here *below* the Python validation (xla_qops/spec.py), since a caller of
``torch.ops`` or ``jax.ffi.ffi_call`` never passes through it, and once through
the public faces (``torch.ops.xla.quantized_matmul.formats`` and the jitted
``xla_qops.quantized_matmul(..., impl="custom_call")``), which add unpacked
int4 and their own checks.

Drawn: shapes (0, 1, odd, around the 64-column tile, K up to 16384, N up to
32000, element counts bounded so each case takes milliseconds), per-channel
and every block size dividing K (odd ones too), every weight format (int8,
int4 packed and unpacked, fp8 e4m3fn, fp4 e2m1) with arbitrary bytes, both
activation formats, x dtypes, zero point presence, x strides and storage
offsets (transposed, strided, misaligned by one element, extra batch dims)
and, for the FFI target, vmap-style leading batch dims on any operand. The
property: each valid call equals the float64 statement
(tests/numpy_reference.py, its derived elementwise bound), and each call made
invalid by one mutation (dtype, shape, rank, contiguity, bits, block size,
format names, y's shape) raises a Python exception with a message; nothing
crashes, hangs or reads out of bounds (scripts/sanitize.sh runs this file
under ASan/UBSan).

The default suite runs a derandomized (fixed) sequence of cases in seconds;
``XLA_QOPS_FUZZ_CASES=n`` (scripts/fuzz.py, ``make fuzz``) runs n random
cases per property and prints the counts.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import numpy_reference as ref
import xla_qops
from xla_qops.backends import custom_call

from conftest import HAVE_TORCH

# n random cases per property for the long run; 0: the seeded short run.
LONG_RUN = int(os.environ.get("XLA_QOPS_FUZZ_CASES", "0"))


def fuzz_settings(short_run_cases: int):
    return settings(
        max_examples=LONG_RUN or short_run_cases, derandomize=not LONG_RUN, deadline=None,
        database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])


# What each property saw: (property, "checked" | "raised") -> count.
CASES: collections.Counter = collections.Counter()

# Bounds that keep one case to milliseconds (and the float64 reference small).
MAX_WEIGHT_ELEMENTS = 1 << 18   # N * K: K = 16384 allows N <= 16, N = 32000 K <= 8
MAX_X_ELEMENTS = 1 << 15        # M * K
MAX_Y_ELEMENTS = 1 << 16        # M * N

WEIGHT_FORMATS = ("int8", "int4", "int4-unpacked", "fp8", "fp4")
X_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
# Typical |value| of a random code of each format: the scale brings each
# output to O(1), so that no float16 result overflows (a finite float64
# reference against an infinite result would be a false finding).
TYPICAL_CODE = {"int8": 64.0, "int4": 4.0, "int4-unpacked": 4.0, "fp8": 64.0, "fp4": 3.0}
E4M3_NAN_BITS = (0x7F, 0xFF)


@dataclasses.dataclass
class Case:
    """One valid problem, numpy arrays in API.md's layouts."""
    x: np.ndarray               # [M, K], x dtype
    w: np.ndarray               # int8 / uint8 (packed int4, fp4 codes) / float8_e4m3fn
    scale: np.ndarray           # float32
    zero_point: np.ndarray | None
    block_size: int
    weight_format: str          # WEIGHT_FORMATS
    activation_format: str | None  # None: A16
    x_layout: str               # how the torch x is laid out in memory

    @property
    def packed(self) -> bool:
        return self.weight_format in ("int4", "fp4")

    @property
    def n(self) -> int:
        return self.w.shape[-1] if self.block_size != -1 else self.w.shape[0]

    @property
    def kernel_bits(self) -> int:
        return 4 if self.packed else 8

    @property
    def kernel_weight_format(self) -> str:
        return self.weight_format if self.weight_format in ("fp8", "fp4") else "int"

    def reference_check(self, actual) -> None:
        """|actual - float64 reference| within the derived bound, elementwise."""
        actual = np.asarray(actual, np.float64).reshape(self.x.shape[0], self.n)
        if 0 in (*self.x.shape, self.n):  # M, K or N empty: numpy_reference's reshapes
            np.testing.assert_array_equal(actual, np.zeros_like(actual))  # need sizes;
            return  # K = 0 is an empty sum, exactly zero
        float_format = self.weight_format if self.weight_format in ("fp8", "fp4") else None
        ref.assert_close(actual,
                         self.x, self.w, self.scale, self.zero_point, self.block_size,
                         self.activation_format is not None,
                         weight_format=float_format, activation_format=self.activation_format)


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0] if k else [1, 2, 3, 6, 32, 128]


@st.composite
def cases(draw, public: bool = False):
    """A valid problem; `public` adds int4 stored unpacked (only the public faces
    take it: the operators take int8 or packed bytes)."""
    formats = WEIGHT_FORMATS if public else tuple(f for f in WEIGHT_FORMATS
                                                    if f != "int4-unpacked")
    fmt = draw(st.sampled_from(formats))
    packed = fmt in ("int4", "fp4")
    k = draw(st.one_of(st.integers(0, 40),
                       st.sampled_from([63, 64, 65, 127, 128, 129, 255, 256, 1000, 4096, 16384]),
                       st.integers(0, 16384)))
    if packed and k % 2:
        k += 1
    n = draw(st.one_of(st.integers(0, 70), st.sampled_from([1, 63, 64, 65, 129, 1000, 32000])))
    n = min(n, MAX_WEIGHT_ELEMENTS // max(k, 1))
    m = draw(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33]))
    m = min(m, MAX_X_ELEMENTS // max(k, 1), MAX_Y_ELEMENTS // max(n, 1))

    block_size = -1
    if draw(st.booleans()):
        choices = [d for d in _divisors(k) if not (packed and d % 2)]
        if choices:
            block_size = draw(st.sampled_from(choices))
    groups = k // block_size if block_size != -1 else 1

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x_dtype = draw(st.sampled_from(sorted(X_DTYPES)))
    x = rng.standard_normal((m, k)).astype(np.float32).astype(X_DTYPES[x_dtype])

    # Arbitrary codes of the format (fp8: every byte but the two NaNs).
    if fmt == "int8":
        values = rng.integers(-128, 128, (n, k)).astype(np.int8)
    elif fmt in ("int4", "int4-unpacked"):
        values = rng.integers(-8, 8, (n, k)).astype(np.int8)
    elif fmt == "fp8":
        codes = rng.integers(0, 256, (n, k)).astype(np.uint8)
        codes[np.isin(codes, E4M3_NAN_BITS)] = 0
        values = codes.view(ml_dtypes.float8_e4m3fn)
    else:  # fp4: any nibble is a valid e2m1 code
        values = rng.integers(0, 16, (n, k)).astype(np.int8)
    pair_axis = -1 if block_size == -1 else 1
    if block_size == -1:
        w = values
    else:
        w = np.ascontiguousarray(values.T.reshape(groups, block_size, n))
    if packed:
        w = ref.pack_int4(w, pair_axis)

    scale_shape = (n,) if block_size == -1 else (groups, n)
    magnitude = TYPICAL_CODE[fmt] * np.sqrt(max(k, 1))
    scale = (rng.uniform(0.5, 2.0, scale_shape) / magnitude).astype(np.float32)
    zero_point = None
    if fmt.startswith("int") and draw(st.booleans()):
        zero_point = (scale * rng.uniform(-8, 8, scale_shape)).astype(np.float32)
    activation_format = draw(st.sampled_from([None, "int8", "fp8"]))
    x_layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "offset-by-one",
                                     "batched"]))
    return Case(x, np.ascontiguousarray(w), scale, zero_point, block_size, fmt,
                activation_format, x_layout)


# ------------------------------------------------------------------ torch operator

if HAVE_TORCH:
    import torch

    import torch_bridge  # noqa: F401  (registers torch.ops.xla.quantized_matmul)
    from torch_bridge import _cpu_ops


def torch_x(case: Case):
    """x as a torch tensor laid out per `case.x_layout` (values unchanged)."""
    x32 = torch.from_numpy(case.x.astype(np.float32))
    dtype = getattr(torch, np.dtype(case.x.dtype).name)
    m, k = x32.shape
    if case.x_layout == "transposed":      # column-major storage
        return x32.t().contiguous().to(dtype).t()
    if case.x_layout == "strided":         # every other element of a wider row
        wide = torch.zeros((m, 2 * k), dtype=dtype)
        wide[:, ::2] = x32.to(dtype)
        return wide[:, ::2]
    if case.x_layout == "offset-by-one":   # storage offset of one element: misaligned
        flat = torch.zeros(m * k + 1, dtype=dtype)
        flat[1:] = x32.reshape(-1).to(dtype)
        return flat[1:].view(m, k)
    if case.x_layout == "batched":         # [1, M, K]: leading dims fold into M
        return x32.to(dtype).unsqueeze(0)
    return x32.to(dtype)


def torch_weights(case: Case):
    w = torch.from_numpy(case.w.view(np.uint8) if case.weight_format == "fp8" else case.w)
    if case.weight_format == "fp8":
        w = w.view(torch.float8_e4m3fn)
    zp = None if case.zero_point is None else torch.from_numpy(case.zero_point)
    return w, torch.from_numpy(case.scale), zp


def torch_op_args(case: Case) -> list:
    """The operator's arguments for a valid case."""
    w, scale, zp = torch_weights(case)
    return [torch_x(case), w, scale, zp, case.block_size, case.kernel_bits,
            case.activation_format is not None, case.kernel_weight_format,
            case.activation_format or "int8"]


def _strided(t):
    """The same values in non-contiguous storage (the last dim spaced by two)."""
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


# One mutation each, every one invalid for the operator (the op must raise):
# index into the argument list, and the new value given the valid one.
TORCH_MUTATIONS = {
    "bits": (5, lambda a: a[5] and {8: 4, 4: 8}[a[5]]),
    "bits-unknown": (5, lambda a: 3),
    "block_size-zero": (4, lambda a: 0),
    "block_size-negative": (4, lambda a: -2),
    "block_size-not-dividing": (4, lambda a: a[0].shape[-1] + 1),
    "w-dtype": (1, lambda a: a[1].view(torch.uint8).to(torch.int16)),
    "w-float32": (1, lambda a: a[1].view(torch.uint8).to(torch.float32)),
    "w-extra-row": (1, lambda a: torch.cat([a[1], a[1].narrow(-1, 0, 1)], -1)
                    if a[4] != -1 else torch.cat([a[1], a[1].narrow(0, 0, 1)], 0)),
    "w-rank": (1, lambda a: a[1].reshape(-1)),
    "w-strided": (1, lambda a: _strided(a[1])),
    "scale-float64": (2, lambda a: a[2].double()),
    "scale-shape": (2, lambda a: torch.cat([a[2], a[2].narrow(-1, 0, 1)], -1)),
    "scale-strided": (2, lambda a: _strided(a[2])),
    "zero_point-shape": (3, lambda a: torch.zeros(a[2].numel() + 1)),
    "zero_point-bfloat16": (3, lambda a: a[2].to(torch.bfloat16)),
    "weight_format": (7, lambda a: "e4m3"),
    "activation_format": (8, lambda a: "int4"),
    "x-float64": (0, lambda a: a[0].double()),
    "x-int8": (0, lambda a: a[0].to(torch.int8)),
    "x-scalar": (0, lambda a: a[0].new_zeros(())),
}


def _mutation_applies(name: str, args: list) -> bool:
    """False where a mutation would leave this case valid (or not apply)."""
    x, w, scale, zero_point = args[:4]
    if name.endswith("-strided"):  # an empty tensor, or a last dim of 1, stays contiguous
        t = w if name.startswith("w") else scale
        return t.numel() > 0 and t.shape[-1] >= 2
    if name == "w-extra-row":
        return w.numel() > 0
    if name == "scale-shape":
        return scale.shape[-1] >= 1
    if name == "zero_point-bfloat16":
        return zero_point is not None
    if name.startswith("block_size"):  # K = 0: every block size divides it
        return x.shape[-1] > 0
    return True


@pytest.mark.torch
def test_torch_operator_matches_the_reference_or_raises():
    if not _cpu_ops.available():
        pytest.fail("torch_bridge._torch_ops is not built")
    op = torch.ops.xla_qops_cpu.quantized_matmul

    @fuzz_settings(short_run_cases=120)
    @given(case=cases(), mutation=st.one_of(st.none(), st.sampled_from(sorted(TORCH_MUTATIONS))),
           threads=st.sampled_from([1, 2, 3]))
    def property_(case, mutation, threads):
        torch.set_num_threads(threads)
        args = torch_op_args(case)
        if mutation is None:
            y = op(*args)
            assert y.dtype == args[0].dtype
            assert tuple(y.shape) == (*args[0].shape[:-1], case.n)
            case.reference_check(y.float().numpy())
            CASES["torch operator", "checked"] += 1
            return
        index, change = TORCH_MUTATIONS[mutation]
        if not _mutation_applies(mutation, args):
            return
        args[index] = change(args)
        with pytest.raises(RuntimeError, match="xla_qops_cpu::quantized_matmul|expected"):
            op(*args)
        CASES["torch operator", "raised"] += 1

    threads = torch.get_num_threads()
    try:
        property_()
    finally:
        torch.set_num_threads(threads)
    report("torch operator")


@pytest.mark.torch
def test_torch_public_op_matches_the_reference_or_refuses():
    """``torch.ops.xla.quantized_matmul.formats`` on CPU tensors: the
    validation, unpacked int4 packing (or int8 for odd pairs) and the direct
    route; refused input raises TypeError / ValueError before any kernel."""
    op = torch.ops.xla.quantized_matmul.formats

    @fuzz_settings(short_run_cases=40)
    @given(case=cases(public=True), refuse=st.sampled_from([None, "block", "scale", "w"]))
    def property_(case, refuse):
        w, scale, zp = torch_weights(case)
        x = torch_x(case)
        args = [x, w, scale, zp, case.block_size, case.weight_format.startswith("int4"),
                case.activation_format is not None,
                case.weight_format.split("-")[0], case.activation_format]
        if refuse == "block" and x.shape[-1] == 0:  # every block size divides K = 0
            refuse = None
        if refuse is None:
            case.reference_check(op(*args).float().numpy())
            CASES["torch public op", "checked"] += 1
            return
        if refuse == "block":
            args[4] = x.shape[-1] + 1
        elif refuse == "scale":
            args[2] = torch.ones(scale.numel() + 1)
        else:
            args[1] = w.reshape(-1)
        with pytest.raises((TypeError, ValueError), match="expected"):
            op(*args)
        CASES["torch public op", "raised"] += 1

    property_()
    report("torch public op")


# ------------------------------------------------------------------ XLA FFI target

def ffi_call(x, w, scale, zero_point, n, *, block_size, bits, has_zero_point,
             quantize_activation, weight_format, activation_format, y_lead=(), y_rows=None):
    """The FFI target exactly as the backend calls it (jax.ffi.ffi_call), any operands."""
    assert custom_call.available(), "xla_qops._cpu_kernels is not built"
    rows = x.shape[-2] if y_rows is None else y_rows
    call = jax.ffi.ffi_call(custom_call.TARGET,
                            jax.ShapeDtypeStruct((*y_lead, rows, n), x.dtype))
    return call(x, w, scale, zero_point, block_size=block_size, bits=bits,
                has_zero_point=has_zero_point, quantize_activation=quantize_activation,
                weight_format=weight_format, activation_format=activation_format)


def ffi_attrs(case: Case) -> dict:
    return dict(block_size=case.block_size, bits=case.kernel_bits,
                has_zero_point=int(case.zero_point is not None),
                quantize_activation=int(case.activation_format is not None),
                weight_format=case.kernel_weight_format,
                activation_format=case.activation_format or "int8")


# One mutation each of the FFI call, every one invalid: it must raise.
FFI_MUTATIONS = {
    "bits": lambda ops, attrs: attrs.update(bits={8: 4, 4: 8}[attrs["bits"]]),
    "bits-unknown": lambda ops, attrs: attrs.update(bits=2),
    "block_size-zero": lambda ops, attrs: attrs.update(block_size=0),
    "block_size-not-dividing": lambda ops, attrs: attrs.update(
        block_size=ops["x"].shape[-1] + 1),
    "weight_format": lambda ops, attrs: attrs.update(weight_format="int4"),
    "activation_format": lambda ops, attrs: attrs.update(activation_format="bf16"),
    "y-columns": lambda ops, attrs: ops.update(n=ops["n"] + 1),
    "y-rows": lambda ops, attrs: ops.update(y_rows=ops["x"].shape[-2] + 1),
    "w-dtype": lambda ops, attrs: ops.update(w=jnp.asarray(ops["w"]).view(jnp.uint8)
                                             .astype(jnp.int16)),
    "w-rank": lambda ops, attrs: ops.update(w=jnp.asarray(ops["w"]).reshape(-1)),
    "scale-shape": lambda ops, attrs: ops.update(
        scale=jnp.ones(ops["scale"].shape[:-1] + (ops["scale"].shape[-1] + 1,))),
    "zero_point-shape": lambda ops, attrs: (
        attrs.update(has_zero_point=1), ops.update(zero_point=jnp.ones((ops["n"] + 1,)))),
    "x-int32": lambda ops, attrs: ops.update(x=jnp.zeros(ops["x"].shape, jnp.int32)),
    "batch-mismatch": lambda ops, attrs: ops.update(w=jnp.stack([ops["w"]] * 2),
                                                    y_lead=(3,), x=jnp.stack([ops["x"]] * 3)),
}


def _ffi_operands(case: Case, batch_of: str | None):
    """The call's operands (jax arrays); `batch_of`: None, or "x" / "w" / "all"
    given a leading batch dim of 2 (vmap's expand_dims form; the others 1)."""
    x = jnp.asarray(case.x)
    w = jnp.asarray(case.w)
    scale = jnp.asarray(case.scale)
    zp = scale if case.zero_point is None else jnp.asarray(case.zero_point)
    ops = dict(x=x, w=w, scale=scale, zero_point=zp, n=case.n)
    if batch_of is not None:
        for name in ("x", "w", "scale", "zero_point"):
            batched = batch_of == "all" or batch_of == name or (
                batch_of == "w" and name in ("scale", "zero_point"))
            # A batch of 2 of the same operand: both results equal the single one.
            ops[name] = (jnp.stack([ops[name]] * 2) if batched else ops[name][None])
        ops["y_lead"] = (2,)
    return ops


def test_ffi_target_matches_the_reference_or_raises():
    """The FFI target through jax.ffi.ffi_call, bypassing xla_qops.spec."""

    @fuzz_settings(short_run_cases=30)
    @given(case=cases(), batch_of=st.sampled_from([None, None, "x", "w", "all"]),
           mutation=st.one_of(st.none(), st.none(), st.sampled_from(sorted(FFI_MUTATIONS))))
    def property_(case, batch_of, mutation):
        ops = _ffi_operands(case, batch_of)
        attrs = ffi_attrs(case)
        if mutation is None:
            y = np.asarray(ffi_call(**ops, **attrs).astype(jnp.float32))
            for item in (y if y.ndim == 3 else [y]):  # each batch element: the same problem
                case.reference_check(item)
            CASES["FFI target", "checked"] += 1
            return
        if (mutation == "batch-mismatch" and batch_of is not None) or (
                mutation.startswith("block_size") and case.x.shape[-1] == 0) or (
                0 in (case.x.shape[0], case.n)):
            return  # still valid; or an empty result, for which XLA never calls the target
        FFI_MUTATIONS[mutation](ops, attrs)
        with pytest.raises(Exception, match="xla_qops_quantized_matmul|expected|dtype"):
            jax.block_until_ready(ffi_call(**ops, **attrs))
        CASES["FFI target", "raised"] += 1

    property_()
    report("FFI target")


def test_jitted_custom_call_matches_the_reference_or_refuses():
    """``jax.jit(xla_qops.quantized_matmul)`` with impl="custom_call": every
    format including unpacked int4 (packed in the graph or run as int8)."""

    @fuzz_settings(short_run_cases=25)
    @given(case=cases(public=True), refuse=st.sampled_from([None, None, "block", "w"]))
    def property_(case, refuse):
        fmt = case.weight_format.split("-")[0]
        static = dict(block_size=case.block_size, int4_weight=fmt == "int4",
                      quantize_activation=case.activation_format is not None,
                      weight_format=fmt, activation_format=case.activation_format,
                      impl="custom_call")
        zp = None if case.zero_point is None else jnp.asarray(case.zero_point)
        w = jnp.asarray(case.w)
        if refuse == "block" and case.x.shape[-1] == 0:  # every block size divides K = 0
            refuse = None
        if refuse == "block":
            static["block_size"] = case.x.shape[-1] + 1
        elif refuse == "w":
            w = w.reshape(-1)
        matmul = jax.jit(lambda x, w, s, z: xla_qops.quantized_matmul(x, w, s, z, **static))
        if refuse is None:
            y = matmul(jnp.asarray(case.x), w, jnp.asarray(case.scale), zp)
            case.reference_check(np.asarray(y.astype(jnp.float32)))
            CASES["jitted custom_call", "checked"] += 1
            return
        with pytest.raises((TypeError, ValueError), match="expected"):
            matmul(jnp.asarray(case.x), w, jnp.asarray(case.scale), zp)
        CASES["jitted custom_call", "raised"] += 1

    property_()
    report("jitted custom_call")


def report(entry: str) -> None:
    """Prints the counts (scripts/fuzz.py collects them) and asserts the run
    compared results and saw refusals: a strategy that only ever produced
    invalid (or only valid) calls would prove little."""
    checked, raised = CASES[entry, "checked"], CASES[entry, "raised"]
    print(f"\nfuzz {entry}: {checked} calls equal the float64 reference, "
          f"{raised} invalid calls raised")
    assert checked >= 10 and raised >= 3, (checked, raised)


def test_unpacked_int4_with_no_input_features():
    """in = 0 with an unpacked int4 weight: the custom_call backend packs it in
    the graph, which once failed on the empty axis (found by the fuzzer); the
    result is the empty sum, zeros."""
    x = jnp.zeros((3, 0), jnp.float32)
    w = jnp.zeros((5, 0), jnp.int8)
    y = jax.jit(lambda x, w: xla_qops.quantized_matmul(
        x, w, jnp.ones(5), None, -1, True, impl="custom_call"))(x, w)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((3, 5), np.float32))
