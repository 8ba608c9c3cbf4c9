"""torch models as jitted JAX functions (torchax): the op lowered to xla_qops.

    import torch_bridge
    torch_bridge.register_with_torchax()      # before creating the torchax env
    env = torchax.default_env()
    params, fn = torchax.extract_jax(model, env)

`register_with_torchax` tells torchax that ``torch.ops.xla.quantized_matmul``
is `xla_qops.quantized_matmul`, so a module-swapped model traces into one JAX
program with the kernels inside it. Needs torchax (not a dependency of the
package; ``pip install torchax==0.0.7 --no-deps`` on the pinned stack).
"""

from __future__ import annotations

import dataclasses
import functools


@functools.cache
def register_with_torchax() -> None:
    """Teaches torchax that torch.ops.xla.quantized_matmul is xla_qops' op.

    Also keeps scaled_dot_product_attention's output in the query's dtype, as
    torch does: torchax 0.0.7 returns float32 for bfloat16 inputs (its
    reference multiplies by a Python float, which JAX promotes; google/torchax
    issue 31, fixed in later releases). Without that, a bfloat16 model's
    activations turn float32 from the first attention on, and every A16
    matmul after it runs the float32 form (three bfloat16 terms of x, three
    times the arithmetic): a Llama's batch-4 decode step took 1.7x as long.
    Call before creating the torchax environment (it loads ops at creation).
    """
    import torch
    from torchax.ops import jtorch, ops_registry  # noqa: F401 (jtorch registers torch's ops)

    import xla_qops
    from torch_bridge import op  # noqa: F401 (defines torch.ops.xla.quantized_matmul)

    def quantized_matmul(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                         quantize_activation=False, weight_format=None, activation_format=None,
                         impl="auto"):
        return xla_qops.quantized_matmul(
            x, w, scale, zero_point, -1 if block_size is None else block_size,
            bool(int4_weight), bool(quantize_activation), weight_format=weight_format,
            activation_format=activation_format, impl=impl)

    def with_impl(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                  quantize_activation=False, impl="auto"):
        return quantized_matmul(x, w, scale, zero_point, block_size, int4_weight,
                                quantize_activation, impl=impl)

    op = torch.ops.xla.quantized_matmul
    # Every overload the bridge defines (torch_bridge.op): torch_xla's schema,
    # the float formats' and the explicit impl's.
    for overload, function in (("default", quantized_matmul), ("formats", quantized_matmul),
                               ("with_impl", with_impl)):
        if overload in op.overloads():
            ops_registry.register_torch_dispatch_op(getattr(op, overload), function)
    for registry, attention in (
            (ops_registry.all_torch_functions, torch.nn.functional.scaled_dot_product_attention),
            (ops_registry.all_aten_ops, torch.ops.aten.scaled_dot_product_attention)):
        if attention in registry:
            registry[attention] = _in_query_dtype(registry[attention])


def _in_query_dtype(operator):
    """The torchax operator with its result cast to its first argument's dtype."""
    inner, on_jax = operator.func, operator.is_jax_function

    def attention(query, *args, **kwargs):
        out = inner(query, *args, **kwargs)
        return out.astype(query.dtype) if on_jax else out.to(query.dtype)
    return dataclasses.replace(operator, func=attention)
