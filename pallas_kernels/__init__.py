"""Pallas kernels for xla-qops' quantized matmul.

* `pallas_kernels.tpu.quantized_matmul`: Mosaic kernels (TPU), all of W8A16,
  W4A16, W8A8, W4A8, per-channel and blockwise; the same kernel body runs on
  the CPU with ``interpret=True``.
* `pallas_kernels.gpu.quantized_matmul`: Triton kernels (GPU), same schemes.
* `pallas_kernels.block_sizes`: the one place block sizes are chosen.
* `pallas_kernels.operands`: the shared prologue (API layouts -> kernel operands).
* `pallas_kernels.reference`: pure-JAX statement of the kernels' algebra.
* `pallas_kernels.tpu.mosaic_check`: Mosaic's layout passes, run without a TPU.

`xla_qops.backends.pallas` is the project's entry point to these kernels.
"""
