"""The implementations a benchmark case is timed with, each from one float weight.

Every peer builds `copies` distinct weights in its own format (so decode cases
can rotate through more bytes than the last-level cache holds) and returns a
callable ``step(i)`` that runs the matmul on copy ``i % copies`` and waits for
the result. Peers:

* ``ours``: ``xla_qops.quantized_matmul(..., impl="custom_call")`` under jit
  (`jax_peer` runs any impl; the bench times only this one).
* ``torch_q``: torch's own CPU kernel for the scheme, given the very weights
  ours reads (same scheme; a symmetric weight has zero points of 0):
  ``_weight_int4pack_mm_for_cpu`` (W4A16) or ``_weight_int8pack_mm`` (W8A16,
  symmetric per-channel only); None for the others.
* ``torch_bf16``: ``torch.nn.functional.linear`` with a bf16 weight (the
  unquantized layer: a different scheme, labelled as such in the reports).
* ``int_twin`` (float formats only, `Scheme.int_twin`): ours again on the
  integer scheme that reads the same bytes (fp8 against int8 per-channel, fp4
  against int4 with the fp4 scheme's block size), from the same float
  weights: the float format's decode cost, like for like (issue F).
* ``torchao_fp8`` (W8A16-fp8 only): torchao's ``Float8WeightOnlyConfig`` on
  an ``nn.Linear`` of torch CPU tensors, the peer a CPU user of fp8 weights
  has (same scheme: e4m3fn per output channel, scale amax / 448; torchao
  quantizes the same float weights itself).
* ``torch_xla``: torch_xla's ``torch.ops.xla.quantized_matmul`` on its CPU
  device (its own op, not torch_bridge's), same weights. Its int4 path copies
  the weight to the host on every call and bakes it into the graph as a
  constant: every weight it has not seen compiles a new graph, so the bench
  gives it one weight and counts compilations (``step.compilations()``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

import xla_qops


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    block_size: int
    symmetric: bool
    quantize_activation: bool
    # quantize_weight's format: "int", or a float element format (API.md
    # section 7: "fp8", "mxfp4", "nvfp4"; float formats are symmetric, and
    # their activations, when quantized, are fp8).
    format: str = "int"
    # For a float format: the integer scheme that reads the same bytes (same
    # bits, block size and scales), timed in the same turns (`int_twin`).
    int_twin: "Scheme | None" = None


SCHEMES = {
    "w8a16": Scheme("w8a16", 8, -1, True, False),
    "w4a16-g128-sym": Scheme("w4a16-g128-sym", 4, 128, True, False),
    "w4a16-g128-asym": Scheme("w4a16-g128-asym", 4, 128, False, False),
    "w8a8": Scheme("w8a8", 8, -1, True, True),
}
# The float formats (issue F), each beside the integer scheme of the same bytes.
SCHEMES.update({
    "w8a16-fp8": Scheme("w8a16-fp8", 8, -1, True, False, "fp8", SCHEMES["w8a16"]),
    "w4a16-mxfp4": Scheme("w4a16-mxfp4", 4, 32, True, False, "mxfp4",
                          Scheme("w4a16-g32-sym", 4, 32, True, False)),
    "w4a16-nvfp4": Scheme("w4a16-nvfp4", 4, 16, True, False, "nvfp4",
                          Scheme("w4a16-g16-sym", 4, 16, True, False)),
    "w8a8-fp8": Scheme("w8a8-fp8", 8, -1, True, True, "fp8", SCHEMES["w8a8"]),
})


def wait_settings() -> str:
    """The environment variables that change how idle threads wait (OpenMP's
    spinning, glibc's tunables), as the benchmark headers print them."""
    return ", ".join(f"{v}={os.environ.get(v, '(unset)')}"
                     for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES"))


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 8 GiB
    if /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


# Share of the available memory the copies of one case may take, all peers'
# together.
ROTATION_MEMORY_SHARE = 0.4


def rotation_copies(llc: int, nbytes: int, bytes_per_copy: int) -> int:
    """How many distinct weights a decode case rotates through: enough that
    their `nbytes` each read more than twice the LLC (from DRAM, as a decode
    step reads its weights), as far as ROTATION_MEMORY_SHARE of the available
    memory holds `bytes_per_copy` (what one copy costs across every peer's
    form of it), and at least 2. (A 480 MiB LLC asked for 120 float copies of
    a 4096x4096 layer and the bench was OOM-killed at 24 GB.)"""
    wanted = -(-2 * llc // nbytes)
    fits = int(ROTATION_MEMORY_SHARE * available_memory()) // bytes_per_copy
    return max(2, min(wanted, fits))


def float_weights(rng, n_out, n_in, copies):
    """`copies` distinct float32 weights [out, in] (numpy), scaled like a linear layer."""
    base = rng.standard_normal((n_out, n_in), dtype=np.float32) * (1.0 / np.sqrt(n_in))
    return [base + np.float32(0.01 * i) for i in range(copies)]


def quantized(ws, scheme):
    if scheme.format != "int":
        return [xla_qops.quantize_weight(jnp.asarray(w), format=scheme.format,
                                         block_size=scheme.block_size) for w in ws]
    return [xla_qops.quantize_weight(jnp.asarray(w), bits=scheme.bits,
                                     block_size=scheme.block_size,
                                     symmetric=scheme.symmetric) for w in ws]


def weight_bytes(qw) -> int:
    """Bytes a matmul reads from the weight (integers, scales, zero points)."""
    return qw.nbytes


def jax_peer(qws, x_np, scheme, impl):
    x = jnp.asarray(x_np, jnp.bfloat16)
    f = jax.jit(lambda x, qw: xla_qops.quantized_matmul(
        x, qw, quantize_activation=scheme.quantize_activation, impl=impl))
    return lambda i: f(x, qws[i % len(qws)]).block_until_ready()


def torch_quantized_peer(qws, x_np, scheme):
    """torch's CPU kernel for this scheme, or None if torch has none."""
    import torch
    x = torch.from_numpy(x_np).to(torch.bfloat16)
    if scheme.quantize_activation or scheme.format != "int":
        return None  # no torch CPU kernel for these (torchao's fp8: torchao_fp8_peer)
    if scheme.bits == 8:
        if not scheme.symmetric or scheme.block_size != -1:
            return None
        packs = [(torch.from_numpy(np.array(q.w)), torch.from_numpy(np.array(q.scale)).to(torch.bfloat16))
                 for q in qws]
        return lambda i: torch.ops.aten._weight_int8pack_mm(x, *packs[i % len(packs)])
    # int4: torch's CPU form, as the decoder benchmark builds it.
    from xla_qops_app.bench.decoder import torch_int4pack
    packs = [torch_int4pack(q) for q in qws]
    group = scheme.block_size
    return lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, packs[i % len(packs)][0], group, packs[i % len(packs)][1])


def torch_bf16_peer(ws, x_np):
    import torch
    x = torch.from_numpy(x_np).to(torch.bfloat16)
    wt = [torch.from_numpy(w).to(torch.bfloat16) for w in ws]
    return lambda i: torch.nn.functional.linear(x, wt[i % len(wt)])


def torchao_fp8_linears(ws, scheme):
    """torchao's float8 weight-only linears on torch CPU tensors, one per float
    weight (W8A16-fp8 per channel only, else None); built once per case and
    shared by its M (`torchao_fp8_peer`).

    Raises what torchao raises if it cannot quantize on the CPU (the bench
    reports it and goes on without this peer)."""
    if scheme.format != "fp8" or scheme.quantize_activation or scheme.block_size != -1:
        return None
    import torch
    from torchao.quantization import Float8WeightOnlyConfig, quantize_
    linears = []
    for w in ws:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
        quantize_(lin, Float8WeightOnlyConfig())  # per-row e4m3fn, scale amax / 448
        linears.append(lin)
    return linears


def torchao_fp8_peer(linears, x_np):
    """A step over `torchao_fp8_linears` (None if there are none). torchao's
    weight-only path on the CPU dequantizes the weight to bf16 in every call,
    then runs F.linear."""
    if not linears:
        return None
    import torch
    x = torch.from_numpy(x_np).to(torch.bfloat16)

    def step(i):
        with torch.no_grad():
            return linears[i % len(linears)](x)
    return step


def torch_xla_peer(qws, x_np, scheme):
    """torch_xla's own op on its XLA:CPU device (int4 in its unpacked form)."""
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.experimental.xla_quantized_matmul  # noqa: F401  registers the op
    dev = torch_xla.device()
    x = torch.from_numpy(x_np).to(torch.bfloat16).to(dev)
    packs = []
    for q in qws:
        w = np.asarray(q.unpack().w if q.packed else q.w)
        zp = None if q.zero_point is None else torch.from_numpy(np.array(q.zero_point)).to(dev)
        packs.append((torch.from_numpy(w.copy()).to(dev), torch.from_numpy(np.array(q.scale)).to(dev), zp))
    torch_xla.sync()

    def step(i):
        w, s, z = packs[i % len(packs)]
        y = torch.ops.xla.quantized_matmul(x, w, s, z, scheme.block_size, scheme.bits == 4,
                                           scheme.quantize_activation)
        torch_xla.sync()
        xm.wait_device_ops()
        return y
    step.compilations = xla_compilations
    return step


def xla_compilations() -> int:
    """Graphs torch_xla has compiled in this process (its CompileTime metric)."""
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return 0 if data is None else data[0]
