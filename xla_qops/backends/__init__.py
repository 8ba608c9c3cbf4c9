"""Implementations of `quantized_matmul`, one module per backend.

Every backend exposes ``matmul(x, w, scale, zero_point, spec) -> y`` with
``x`` flattened to ``[M, K]``, arguments already validated by
`xla_qops.spec.check_args`, and ``y`` ``[M, N]`` in ``x``'s dtype; and
``supports(spec) -> bool``. `xla_qops.dispatch` is the one place that picks
among them.
"""
